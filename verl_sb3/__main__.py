"""``python -m verl_sb3``: the ``verl-sb3`` command line."""

import sys

from verl_sb3.app.cli import main

if __name__ == "__main__":  # importing the module runs nothing
    sys.exit(main())
