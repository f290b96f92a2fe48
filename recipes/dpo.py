"""DPO: `accelerate launch recipes/dpo.py [--config FILE] [--key value ...]`.

With no arguments it tunes the latest SFT run on the embedded default task's preference pairs, with
that SFT run as the reference, and reports task accuracy before and after and the win rate against
the SFT run judged by the latest reward model.
"""

import sys

from llmtrain.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("dpo", sys.argv[1:]))
