"""calibration.json, the document: its schema (strict pydantic models, unknown keys refused) and constants.

Schema 2 adds the Beta prior of the unbounded tables (`prior`), the fine tail bins (`tail_bins`, per
exit `tail`) of `pcee-lb-tail` and of the baselines' guarded promise. Schema 3 (this version) guards
every policy the same way (per exit, a tail table of the samples the policy lets leave there, for
every grid δ), adds `pcee-lb-global` (one guarded confidence threshold for every exit) and the
optional `input_guard` (calibration.input_guard). Schema 1 and 2 documents still load and decide as
they were fitted; their answers say which promises are unguarded (`rules.Calibration.guarded`).

Structure and types are checked here; what needs the numbers (shapes against the bins, counts
against the stored derived tables) is checked where the tables are built (`rules.Calibration`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, ValidationError, model_validator

from exitserve.calibration.binning import BINNINGS
from exitserve.calibration.confidence import MEASURES
from exitserve.calibration.input_guard import InputGuardDocument

SCHEMA_VERSION = 3
SUPPORTED_SCHEMAS: tuple[int, ...] = (1, 2, 3)
DOCUMENT_KIND = "exitserve-calibration"
# 0.50, 0.51, ..., 0.99 and 1.00: every δ in (0.99, 1] maps to 1.00, below 0.50 to 0.50.
DEFAULT_DELTA_GRID: np.ndarray = np.round(np.linspace(0.50, 1.00, 51), 2)
# The per-bin table policies and the table kind each one reads.
TABLE_POLICIES: dict[str, str] = {"pcee": "accuracy", "pcee-ws": "smoothed", "pcee-lb": "lower"}
CONDITIONAL_KINDS: dict[str, str] = {"pcee-cond": "accuracy", "pcee-ws-cond": "smoothed", "pcee-lb-cond": "lower"}
# Policies with a guarded tail table per exit in schema 2: the tail rule itself, and the baselines whose promise it guards.
TAIL_POLICIES_V2: tuple[str, ...] = ("pcee-lb-tail", "confidence", "per-exit-threshold", "full")
# Schema 3 guards the per-bin policies too: their promise comes from a tail table of their leavers.
PER_BIN_POLICIES: tuple[str, ...] = (*TABLE_POLICIES, *CONDITIONAL_KINDS)
TAIL_POLICIES: tuple[str, ...] = (*TAIL_POLICIES_V2, *PER_BIN_POLICIES)
GLOBAL_POLICY = "pcee-lb-global"  # one confidence threshold for every exit, guarded on the pooled answers
DEFAULT_PRIOR: tuple[float, float] = (0.0, 1.0)  # one imagined wrong sample per bin: never raises a value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


class GridRows(_Strict):
    """A [G, M] stack of per-bin counts stored compactly: distinct rows plus the row each grid δ uses."""

    counts: list[list[int]]
    correct: list[list[int]]
    grid_rows: list[int]


class ConditionalTables(_Strict):
    pcee_cond: GridRows = Field(alias="pcee-cond")
    pcee_ws_cond: GridRows = Field(alias="pcee-ws-cond")
    pcee_lb_cond: GridRows = Field(alias="pcee-lb-cond")

    def of(self, policy: str) -> GridRows:
        return getattr(self, policy.replace("-", "_"))


class TailTables(_Strict):
    """Fine bins (equal-mass edges) and, per policy, counts of the samples its promise is judged on."""

    edges: list[float]
    pcee_lb_tail: GridRows = Field(alias="pcee-lb-tail")
    confidence: GridRows
    per_exit_threshold: GridRows = Field(alias="per-exit-threshold")
    full: GridRows
    # Schema 3: the per-bin policies' leavers.
    pcee: GridRows | None = None
    pcee_ws: GridRows | None = Field(None, alias="pcee-ws")
    pcee_lb: GridRows | None = Field(None, alias="pcee-lb")
    pcee_cond: GridRows | None = Field(None, alias="pcee-cond")
    pcee_ws_cond: GridRows | None = Field(None, alias="pcee-ws-cond")
    pcee_lb_cond: GridRows | None = Field(None, alias="pcee-lb-cond")
    pcee_lb_global: GridRows | None = Field(None, alias="pcee-lb-global")

    def of(self, policy: str) -> GridRows | None:
        return getattr(self, policy.replace("-", "_"))


class GlobalThreshold(_Strict):
    """`pcee-lb-global` per grid δ: the confidence threshold every exit uses (None: none passed the
    test, nothing is promised) and the count and correct count of the pooled answers it was judged on."""

    thresholds: list[float | None]
    counts: list[int]
    correct: list[int]


class MarginThresholds(_Strict):
    thresholds: list[float]
    precision: list[float]


class Agreement(_Strict):
    counts: list[int]
    agree: list[int]


class ExitDocument(_Strict):
    index: int
    temperature: float
    validation_accuracy: float | None = None
    edges: list[float]
    counts: list[int]
    correct: list[int]
    accuracy: list[float | None]
    smoothed_accuracy: list[float | None]
    lower_bound: list[float]
    per_exit_threshold: MarginThresholds
    conditional: ConditionalTables
    agreement: Agreement | None = None
    tail: TailTables | None = None


class CalibrationDocument(_Strict):
    kind: Literal["exitserve-calibration"] = "exitserve-calibration"  # DOCUMENT_KIND
    schema_version: Literal[1, 2, 3]
    num_exits: int = Field(ge=1)
    confidence: Literal[MEASURES]  # type: ignore[valid-type]
    binning: Literal[BINNINGS]  # type: ignore[valid-type]
    bins: int = Field(ge=1)
    tail_bins: int | None = Field(default=None, ge=1)
    window: int = Field(ge=0)
    alpha: float = Field(gt=0.0, lt=1.0)
    # samples per effective sample (clustered calibration data, e.g. the tokens of one answer); 1: independent
    design_effect: float = Field(default=1.0, ge=1.0, allow_inf_nan=False)
    prior: list[float] | None = Field(default=None, min_length=2, max_length=2)
    labels_known: bool
    validation_size: int = Field(ge=0)
    data_fingerprint: str
    delta_grid: list[float]
    exits: list[ExitDocument] = Field(min_length=1)
    global_threshold: GlobalThreshold | None = None
    input_guard: InputGuardDocument | None = None

    @model_validator(mode="after")
    def _schema_parts(self) -> CalibrationDocument:
        if self.num_exits != len(self.exits):
            raise ValueError(f"num_exits is {self.num_exits} but {len(self.exits)} exit tables are given")
        if self.schema_version >= 2:
            missing = [k for k, e in enumerate(self.exits) if e.tail is None]
            if self.prior is None or self.tail_bins is None or missing:
                raise ValueError("schema 2 needs prior, tail_bins and every exit's tail tables")
        if self.schema_version >= 3:
            unguarded = sorted({p for e in self.exits if e.tail is not None for p in (*PER_BIN_POLICIES, GLOBAL_POLICY)
                                if e.tail.of(p) is None})
            if unguarded or self.global_threshold is None:
                raise ValueError("schema 3 needs every policy's tail tables (missing: "
                                 f"{', '.join(unguarded) or 'none'}) and global_threshold")
        elif self.global_threshold is not None or self.input_guard is not None:
            raise ValueError("global_threshold and input_guard need schema_version 3")
        if self.prior is not None and (min(self.prior) < 0 or not all(np.isfinite(self.prior))):
            raise ValueError(f"prior must be two finite pseudo-counts >= 0, got {list(self.prior)}")
        return self

    @property
    def beta_prior(self) -> tuple[float, float]:
        """Pseudo-counts (correct, wrong) of the unbounded tables; schema 1 had none."""
        return (0.0, 0.0) if self.prior is None else (self.prior[0], self.prior[1])


def parse_document(data: object) -> CalibrationDocument:
    """Validate a calibration.json object; ValueError naming the first wrong fields."""
    if not isinstance(data, dict):
        raise ValueError(f"calibration: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version not in SUPPORTED_SCHEMAS or isinstance(version, bool):
        raise ValueError(f"calibration: schema_version {version!r} is not supported "
                         f"(expected one of {', '.join(map(str, SUPPORTED_SCHEMAS))})")
    try:
        return CalibrationDocument.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors()[:3]:
            where = ".".join(str(part) for part in error["loc"])
            problems.append(f"{where}: {error['msg']}" if where else error["msg"])
        raise ValueError("calibration: " + "; ".join(problems)) from None


def check_grid(delta_grid: Sequence[float] | np.ndarray) -> np.ndarray:
    grid = np.asarray(delta_grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError("delta_grid must be a non-empty list of numbers")
    if np.any(~np.isfinite(grid)) or grid[0] <= 0.0 or grid[-1] > 1.0:
        raise ValueError("delta_grid values must lie in (0, 1]")
    if np.any(np.diff(grid) <= 0):
        raise ValueError("delta_grid must be strictly increasing")
    return grid


# One accuracy target in a request body's schema: a JSON number in (0, 1]; "0.9" and true are refused
# (numpy and lax pydantic would read them as 0.9 and 1.0, the latter meaning exact generation).
Delta = Annotated[StrictFloat, Field(gt=0.0, le=1.0, allow_inf_nan=False)]


class Deltas(np.ndarray):
    """Accuracy targets that passed `normalise_deltas`: float64, one per sample, each in (0, 1].

    The type is the proof of the check: `Calibration.step` trusts a `Deltas` and checks anything else.
    Slices and fancy indexing keep the type (numpy subclass views); joining requests' targets goes
    through `Deltas.join`, since `np.concatenate` returns a plain array."""

    @classmethod
    def full(cls, n: int, value: float) -> Deltas:
        """n copies of one target, checked."""
        return normalise_deltas(value, n)

    @classmethod
    def join(cls, parts: Sequence[Deltas]) -> Deltas:
        """Several requests' checked targets as one batch's."""
        return np.concatenate(parts).view(cls)

    @classmethod
    def checked_elsewhere(cls, values: Sequence[float] | np.ndarray) -> Deltas:
        """Targets every one of which a protocol edge has already checked (e.g. each generating sequence's δ,
        checked when its request was parsed): marks them, without a second pass over the values."""
        return np.asarray(values, dtype=np.float64).view(cls)


def normalise_deltas(delta: object, n: int, *, default: float | None = None, where: str = "delta") -> Deltas:
    """The one δ normaliser (dataplane, `Calibration.step`, the replay): a float64 array of n values in (0, 1].

    delta: None (-> `default`, which must then be given), one number for every sample, or n numbers.
    Booleans, strings, NaN/inf and values outside (0, 1] are refused with a ValueError starting
    with `where`.
    """
    if delta is None:
        if default is None:
            raise ValueError(f"{where}: missing")
        delta = default
    if isinstance(delta, bool | str | bytes) or (
        isinstance(delta, list | tuple) and not all(isinstance(v, int | float) and not isinstance(v, bool) for v in delta)
    ):
        raise ValueError(f"{where}: must be a number in (0, 1] or a list of one per sample, got {delta!r}")
    try:
        values = np.asarray(delta, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: must be a number in (0, 1] or a list of one per sample, got {delta!r}") from None
    if isinstance(delta, np.ndarray) and delta.dtype.kind not in "iuf":
        raise ValueError(f"{where}: must be numbers, got an array of {delta.dtype}")
    if values.ndim == 0:
        values = np.full(n, float(values))
    elif values.shape != (n,):
        raise ValueError(f"{where}: {values.size} values for {n} samples")
    bad = ~np.isfinite(values) | (values <= 0) | (values > 1)
    if bad.any():
        raise ValueError(f"{where}: must be in (0, 1], got {float(values[bad][0])!r}")
    return values.view(Deltas)
