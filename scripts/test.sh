#!/usr/bin/env bash
# Set up everything (scripts/setup.sh) and run the whole test suite: lint, types, unit, fake-engine and
# real-vLLM (CPU build) end-to-end tests. Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/setup.sh" | tail -n 1)
cd "$root"
"$venv/bin/ruff" check vllama tests bench
"$venv/bin/ruff" format --check vllama tests bench
"$venv/bin/mypy" vllama
# pytest's exit code 5 ("no tests ran") is a failure here too, as is anything non-zero
PATH="$venv/bin:$PATH" "$venv/bin/python" -m pytest -q -ra "$@"
