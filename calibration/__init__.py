"""Logits -> reliability tables and exit policies; evaluation and plots. numpy only at serving time.

The serving engine uses `Calibration.from_dict(bundle.calibration, num_exits)` and calls
`calibration.step(policy, exit_index, logits, deltas)` after every segment. Modules:

  document      calibration.json's schema (pydantic), constants, `normalise_deltas`
  rules         `Calibration`: the exit rules and the one decision function `step`
  replay        `decide_all`: the engine's loop offline
  observations  per-exit evidence the tables are counted from (also built from served traffic)
  fitting       validation logits -> document (fitting time only: imported lazily here)
  tables, tails, bounds, binning, confidence   the numbers behind the rules
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from exitserve.calibration.document import DEFAULT_DELTA_GRID, SCHEMA_VERSION, normalise_deltas
from exitserve.calibration.replay import Decisions, decide_all
from exitserve.calibration.rules import DEFAULT_POLICY, POLICIES, Calibration, StepDecision

if TYPE_CHECKING:
    from exitserve.calibration.fitting import fit_calibration

__all__ = [
    "DEFAULT_DELTA_GRID",
    "DEFAULT_POLICY",
    "POLICIES",
    "SCHEMA_VERSION",
    "Calibration",
    "Decisions",
    "StepDecision",
    "decide_all",
    "fit_calibration",
    "normalise_deltas",
]


def __getattr__(name: str) -> Any:
    # Fitting code loads only when asked for, so the serving path never imports it.
    if name == "fit_calibration":
        from exitserve.calibration.fitting import fit_calibration

        return fit_calibration
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
