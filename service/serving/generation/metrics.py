"""Prometheus metrics of token generation, registered in the server's registry (base units, no ids as labels)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Decoding steps take milliseconds on a GPU and tens of milliseconds on a CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FRACTION_BUCKETS = tuple(round(x / 20, 2) for x in range(1, 21))


class GenerationMetrics:
    """The series of one generation model (children resolved once: labels() takes a lock)."""

    def __init__(self, registry: CollectorRegistry, model: str, num_exits: int):
        family = _families(registry)
        self.tokens = family["tokens"].labels(model)
        self.ttft = family["ttft"].labels(model)
        self.inter_token = family["itl"].labels(model)
        self.exit_depth = family["depth"].labels(model)
        self.compute_fraction = family["fraction"].labels(model)
        self.exits = [family["exits"].labels(model, str(k)) for k in range(num_exits)]
        self.accepted = family["drafts"].labels(model, "accepted")
        self.rejected = family["drafts"].labels(model, "rejected")
        self.running = family["running"].labels(model)
        self.waiting = family["waiting"].labels(model)
        self.cancelled = family["cancelled"].labels(model)

    def observe_tokens(self, tokens, compute_fractions: list[float], last_exit: int) -> None:
        self.tokens.inc(len(tokens))
        for t in tokens:
            self.exits[t.exit].inc()
            self.exit_depth.observe(t.exit)
            self.compute_fraction.observe(compute_fractions[t.exit])

    def observe_drafts(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.accepted.inc(accepted)
            self.rejected.inc(drafted - accepted)


def _families(registry: CollectorRegistry) -> dict:
    """One set of metric families per registry, shared by every generation model in it."""
    existing = getattr(registry, "_exitserve_generation", None)
    if existing is not None:
        return existing
    r = registry
    families = {
        "tokens": Counter("exitserve_generated_tokens", "Tokens generated (returned to clients)", ["model"], registry=r),
        "ttft": Histogram("exitserve_time_to_first_token_seconds", "Time from request arrival to its first token",
                          ["model"], buckets=LATENCY_BUCKETS, registry=r),
        "itl": Histogram("exitserve_inter_token_latency_seconds", "Time between consecutive tokens of a stream",
                         ["model"], buckets=LATENCY_BUCKETS, registry=r),
        "depth": Histogram("exitserve_token_exit_depth", "Exit index that produced each token", ["model"],
                           buckets=tuple(float(k) for k in range(16)), registry=r),
        "fraction": Histogram("exitserve_token_compute_fraction", "Share of the full model's FLOPs each token used",
                              ["model"], buckets=FRACTION_BUCKETS, registry=r),
        "exits": Counter("exitserve_token_exits", "Tokens produced, by exit index", ["model", "exit"], registry=r),
        "drafts": Counter("exitserve_draft_tokens", "Exact mode: drafted tokens by verification outcome",
                          ["model", "outcome"], registry=r),
        "running": Gauge("exitserve_running_sequences", "Sequences in the decoding batch", ["model"], registry=r),
        "waiting": Gauge("exitserve_waiting_sequences", "Generation requests waiting to join the batch", ["model"],
                         registry=r),
        "cancelled": Counter("exitserve_cancelled_sequences", "Generations stopped early (client gone, stop string)",
                             ["model"], registry=r),
    }
    registry._exitserve_generation = families  # type: ignore[attr-defined]
    return families
