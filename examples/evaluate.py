"""Evaluate a checkpoint: ``python examples/evaluate.py [CHECKPOINT] [options]`` (same as ``verl-sb3 evaluate``).

The checkpoint defaults to the final model of the default training run,
``results/model_checkpoints/final_model.zip``. Options: ``--n-sequences``, ``--seed``, ``--prompt``,
``--temperature``, ``--output-dir`` (see ``--help``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from verl_sb3.app.cli import main, with_default_checkpoint

DEFAULT_CHECKPOINT = "results/model_checkpoints/final_model.zip"

if __name__ == "__main__":
    sys.exit(main(with_default_checkpoint("evaluate", sys.argv[1:], DEFAULT_CHECKPOINT)))
