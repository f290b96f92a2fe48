"""Supervised fine-tuning: `accelerate launch recipes/sft.py [--config FILE] [--key value ...]`.

With no arguments it tunes the latest pretrain run on the embedded default task's prompt/response
pairs and reports task accuracy before and after.
"""

import sys

from llmtrain.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("sft", sys.argv[1:]))
