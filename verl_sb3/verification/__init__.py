"""The parts of a verified update, each with one job.

- :mod:`~verl_sb3.verification.context`: what a check sees (``UpdateContext``) and says (``CheckResult``);
- :mod:`~verl_sb3.verification.checks`: the checks, pure functions over the update's tensors;
- :mod:`~verl_sb3.verification.config`: their thresholds (``VerificationConfig``);
- :mod:`~verl_sb3.verification.verifier`: which checks run (``verify_update``);
- :mod:`~verl_sb3.verification.state`: the model's state an update changes (``ModelState``), the one way back;
- :mod:`~verl_sb3.verification.line_search`: the backtracking between the old and the new policy;
- :mod:`~verl_sb3.verification.judgement`: the next-rollout judgement and its ``RolloutJudge`` interface;
- :mod:`~verl_sb3.verification.reuse_mass`: TextGen-v0's judge;
- :mod:`~verl_sb3.verification.report`: the log (``UpdateRecord``), its counters and the ``verl/`` figures;
- :mod:`~verl_sb3.verification.legacy`: models saved by verl_sb3 0.1.

:mod:`verl_sb3.verified` puts them together on SB3's algorithms.
"""

from verl_sb3.verification.config import VerificationConfig
from verl_sb3.verification.context import Check, CheckResult, UpdateContext
from verl_sb3.verification.judgement import CollectedRollout, RolloutJudge, UndoSettings
from verl_sb3.verification.line_search import LineSearchResult, backtracking_line_search
from verl_sb3.verification.report import UpdateRecord, VerificationReport
from verl_sb3.verification.reuse_mass import ReuseMassJudge
from verl_sb3.verification.state import ModelState
from verl_sb3.verification.verifier import verify_update

__all__ = [
    "Check",
    "CheckResult",
    "CollectedRollout",
    "LineSearchResult",
    "ModelState",
    "ReuseMassJudge",
    "RolloutJudge",
    "UndoSettings",
    "UpdateContext",
    "UpdateRecord",
    "VerificationConfig",
    "VerificationReport",
    "backtracking_line_search",
    "verify_update",
]
