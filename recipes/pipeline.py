"""Run the stages in order on one registry and print one table: `python recipes/pipeline.py`.

tokenizer -> pretrain -> sft, each on its recipe (the embedded default unless --config says otherwise).
A stage whose run already exists and is finished is skipped, unless --redo names it (or `all`).
`--seeds 0,1,2` runs it once per seed (`--control` adds one more epoch of SFT per seed as the control) and ends
with each stage's test headline over the seeds and its gains with bootstrap intervals.
"""

import sys

from llmtrain.cli import run_pipeline

if __name__ == "__main__":
    sys.exit(run_pipeline(sys.argv[1:]))
