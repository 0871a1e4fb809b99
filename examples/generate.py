"""Sample text from a checkpoint: ``python examples/generate.py [CHECKPOINT] [options]``
(the same as ``verl-sb3 generate``).

The checkpoint defaults to ``results/model_checkpoints/final_model.zip``. Example:
``python examples/generate.py --prompt "start sequence generation" --num-sequences 3 --seed 0``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from verl_sb3.app.cli import main, with_default_checkpoint

DEFAULT_CHECKPOINT = "results/model_checkpoints/final_model.zip"

if __name__ == "__main__":
    sys.exit(main(with_default_checkpoint("generate", sys.argv[1:], DEFAULT_CHECKPOINT)))
