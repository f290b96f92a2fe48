"""Run the stages in order on one registry and print one table: `python recipes/pipeline.py`.

tokenizer -> pretrain -> sft, each on its recipe (the embedded default unless --config says otherwise).
A stage whose run already exists and is finished is skipped, unless --redo names it (or `all`).
"""

import sys

from llmtrain.cli import run_pipeline

if __name__ == "__main__":
    sys.exit(run_pipeline(sys.argv[1:]))
