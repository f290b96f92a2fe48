"""PPO: `accelerate launch recipes/ppo.py [--config FILE] [--key value ...]`.

With no arguments it tunes the latest SFT run on the embedded default task's prompts against the latest
reward-model run (critic initialised from it), and reports held-out task accuracy before and after.
"""

import sys

from llmtrain.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("ppo", sys.argv[1:]))
