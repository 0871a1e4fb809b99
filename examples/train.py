"""Train the verified SLM on TextGen-v0: ``python examples/train.py [options]`` (same as ``verl-sb3 train``).

With no options it runs the default training (TrainConfig's defaults) and writes everything into
``results/``: the dashboard (training_curves.png), updates.csv, model_checkpoints/, evaluation.md/json.
``python examples/train.py --help`` lists the options, e.g. ``--total-timesteps 50000 --seed 1``
or ``--config my_run.yaml``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from verl_sb3.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
