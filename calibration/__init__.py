"""Logits -> reliability tables and exit policies; evaluation and plots. numpy only (no torch, no scipy).

The serving engine uses `Calibration.from_dict(bundle.calibration, num_exits)` and calls
`calibration.step(policy, exit_index, logits, deltas)` after every segment.
"""

from exitserve.calibration.fitting import DEFAULT_DELTA_GRID, SCHEMA_VERSION
from exitserve.calibration.policies import (
    POLICIES,
    Calibration,
    Decisions,
    StepDecision,
    decide_all,
    fit_calibration,
)

__all__ = [
    "DEFAULT_DELTA_GRID",
    "POLICIES",
    "SCHEMA_VERSION",
    "Calibration",
    "Decisions",
    "StepDecision",
    "decide_all",
    "fit_calibration",
]
