#!/usr/bin/env bash
# Reproduce the whole pipeline (tokenizer -> pretrain -> SFT -> reward -> DPO -> PPO) with the GPU-node recipes
# on real Hub data sets, then print the table. Run it again after an interruption: finished stages are skipped
# and an interrupted stage resumes from its last checkpoint.
#   launch/reproduce.sh [--name NAME] [--redo STAGE]
# Needs network access to the Hub (data sets are streamed or downloaded into the Hugging Face cache).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python recipes/pipeline.py --config recipes/configs/pipeline/gpt-small.yaml --name gpt-small "$@"
