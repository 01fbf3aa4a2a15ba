"""Why an answer carries no promise: one code per sample, a name per code in every protocol's answer.

Codes are small integers inside the engine (a uint8 array per batch) and these names on the wire;
an answer with `target_met = true` has no reason (None / null / the empty string in OIP tensors).
"""

from __future__ import annotations

PROMISED = 0
BELOW_TARGET = 1  # the guarded accuracy behind this answer does not reach δ (even the last exit's)
OUT_OF_DISTRIBUTION = 2  # the input guard found the input unlike the calibration data
POLICY_UNGUARDED = 3  # the policy has no guarded table in this (older) calibration document

REASON_NAMES: tuple[str | None, ...] = (None, "below_target", "out_of_distribution", "policy_unguarded")


def reason_name(code: int) -> str | None:
    return REASON_NAMES[code]
