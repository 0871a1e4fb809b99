"""``python -m verl_sb3``: the ``verl-sb3`` command line."""

import sys

from verl_sb3.app.cli import main

sys.exit(main())
