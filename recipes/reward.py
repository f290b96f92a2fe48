"""Reward model: `accelerate launch recipes/reward.py [--config FILE] [--key value ...]`.

With no arguments it trains a reward model from the latest SFT run on the embedded task's preference
pairs (correct vs. wrong answer) and reports held-out pairwise accuracy.
"""

import sys

from llmtrain.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("reward", sys.argv[1:]))
