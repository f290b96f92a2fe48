#!/usr/bin/env bash
# Write requirements/lock-cpu.txt: the exact version of every package in the active Python environment, the one
# the figures in docs/results.md were measured in. The package itself keeps version ranges (pyproject.toml); this
# file pins one environment so that its figures can be reproduced:
#   pip install torch==2.13.0 && pip install -c requirements/lock-cpu.txt -e ".[dev]"
# Make it again (from an environment installed as the README says) whenever figures are measured anew.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
out=requirements/lock-cpu.txt
{
  echo "# Made by requirements/lock.sh on $(date -u +%F) from a Python $("$python" -c 'import platform; print(platform.python_version())') environment installed with:"
  echo "#   pip install torch==2.13.0 && pip install -e \".[dev]\""
  echo "# Reproduce it (the figures in docs/results.md were measured in it):"
  echo "#   pip install torch==2.13.0 && pip install -c requirements/lock-cpu.txt -e \".[dev]\""
  "$python" -m pip freeze --exclude-editable | grep -v -i '^llmtrain\b'
} > "$out"
echo "wrote $out ($(grep -vc '^#' "$out") packages)"
