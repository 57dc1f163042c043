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

# The whole run (no arguments) also runs every test that needs no real vLLM under Python 3.12, the GPU hosts'
# Python (asyncio's behaviour differs there), when this machine has one.
if [ $# -eq 0 ]; then
  py312=""
  for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      py312=$candidate
      break
    fi
  done
  if [ -n "$py312" ]; then
    echo "== the tests that need no real vLLM, under $("$py312" --version)" >&2
    venv312=$(VLLAMA_SETUP_LIGHT=1 PYTHON="$py312" VLLAMA_VENV="$HOME/.cache/vllama/venv-py312" \
      bash "$root/scripts/setup.sh" | tail -n 1)
    # test_offline_models.py needs torch, which the light venv lacks (the CPU torch wheel is cp311 only): it ran
    # above, and is left out here rather than reported as skipped
    PATH="$venv312/bin:$PATH" "$venv312/bin/python" -m pytest -q -ra -m "not vllm" -p no:cacheprovider \
      --ignore=tests/test_offline_models.py
  else
    echo "== no Python 3.12 on this machine: the 3.12 run of the tests without real vLLM is skipped" >&2
  fi
fi
