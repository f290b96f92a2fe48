"""Pretrain a small GPT: `accelerate launch recipes/pretrain.py [--config FILE] [--key value ...]`.

With no arguments it trains `gpt-micro` on the embedded default corpus (a few minutes on a CPU).
"""

import sys

from llmtrain.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("pretrain", sys.argv[1:]))
