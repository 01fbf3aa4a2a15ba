"""Server settings: EXITSERVE_* environment variables, overridden by CLI flags."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, PositiveInt, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from exitserve.calibration import POLICIES

DEFAULT_LOOKUP_NGRAM = 3  # generation: the longest tail looked up for drafts (serving/generation/lookup.py)
DEFAULT_LOOKUP_HISTORY = 32768  # generation: tokens of finished answers kept for lookup drafts

RunnerKind = Literal["onnxruntime", "torch"]
RUNNER_KINDS: tuple[RunnerKind, ...] = ("onnxruntime", "torch")
# Classifier settings said "onnx" before issue 29 (generation already said "onnxruntime"); old
# configurations keep working.
RUNNER_ALIASES = {"onnx": "onnxruntime"}


def runner_kind(name: object) -> object:
    """The canonical spelling of a runner kind; anything else passes through for the caller to refuse."""
    return RUNNER_ALIASES.get(name, name) if isinstance(name, str) else name


# Package data of exitserve.bundles: inside the installed package for a wheel, the checkout's bundles/ for an
# editable install (pyproject.toml maps the package there).
MIN_KEY_CHARS = 16  # shorter API keys are accepted with a warning: guessable
DEFAULT_BUNDLE = Path(str(resources.files("exitserve.bundles") / "cifar10-resnet-large"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EXITSERVE_", env_nested_delimiter="__", extra="ignore")

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0: any free port)")
    # NoDecode: a comma-separated EXITSERVE_BUNDLES is split by the validator below, not parsed as JSON.
    bundles: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_BUNDLE],
        description="bundle directories to serve (env: comma-separated or a JSON list)",
    )
    default_delta: float = Field(0.9, gt=0.0, le=1.0, description="accuracy target δ for requests that give none")
    # The guarded tail rule: on the default bundle it keeps the promise at every delta on the test set and
    # in >= 19 of 20 calibration/test splits, and promises far more than pcee-lb-cond (BENCHMARKS.md §2, §4.2).
    default_policy: str = Field("pcee-lb-tail", description="exit policy for requests that name none")
    max_batch_size: int = Field(64, ge=1, description="samples per engine batch")
    # 0 = opportunistic batching: a batch is whatever has queued while the engine was busy, so a lone
    # request never waits; raise it to trade latency for fuller batches at moderate load.
    max_queue_delay_ms: float = Field(0.0, ge=0.0, description="longest wait for a fuller batch, in ms (0: never wait)")
    queue_limit: int = Field(256, ge=1, description="requests waiting per model before 503")
    # Admission counts work, not requests: 300 requests of 64 images are 19,200 samples, far more than
    # a CPU answers within the request timeout. None = 8 engine batches.
    queue_samples: int | None = Field(None, ge=1, description="samples waiting per model before 503 "
                                      "(default: 8 x max_batch_size); also refused when the measured throughput "
                                      "cannot answer the queue within the request timeout")
    max_request_samples: int = Field(1024, ge=1, description="samples per request before 413")
    max_body_bytes: int = Field(64 << 20, ge=1024, description="request body size limit in bytes (413 above)")
    request_timeout_s: float = Field(30.0, gt=0.0, description="seconds a request may wait for its answer before 504")
    drain_timeout_s: float = Field(20.0, ge=0.0, description="seconds to finish in-flight requests on shutdown")
    # torch needs TorchScript twins in the bundle and the train extra; "onnx" (the name before) still works
    runner: Annotated[RunnerKind, BeforeValidator(runner_kind)] = Field(
        "onnxruntime", description="onnxruntime, or torch: the bundle's TorchScript twins")
    provider: Literal["cpu", "cuda"] = Field("cpu", description="ONNX Runtime execution provider")
    device_id: int = Field(0, description="GPU index for the cuda provider")
    threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads")
    large_batch_threads: int | None = Field(
        None, ge=1, description="intra-op threads for batches of at least large_batch_rows (default: threads); "
                                "a second set of sessions, so the weights twice in memory")
    large_batch_rows: int = Field(32, ge=1, description="batch rows from which large_batch_threads applies")
    thread_pool: Literal["global", "per-session"] = Field(
        "per-session", description="ONNX Runtime thread pools: one per segment session or one shared")
    spinning: bool = Field(False, description="let idle ONNX Runtime threads spin (lower latency, busy CPUs)")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimisation level")
    workers: int = Field(1, ge=1, description="engine threads per model")
    # Measured (BENCHMARKS.md, "Language models"): on CPU a decoding step runs 1.56x faster on ONNX Runtime.
    # On CUDA, auto keeps torch: the ONNX Runtime CUDA path is written but has not run on a GPU yet.
    generation_runner: Annotated[Literal["auto", "onnxruntime", "torch"], BeforeValidator(runner_kind)] = Field(
        "auto", description="what runs a generation bundle's layers and heads: auto = onnxruntime on cpu, torch "
                            "on cuda (the KV cache and attention are torch's either way)")
    generation_weights: Literal["float32", "int8", "int4"] = Field(
        "float32", description="weight precision of a generation bundle's layer and head graphs (onnxruntime "
                               "runner): int8/int4 are ONNX Runtime's blockwise weight-only MatMulNBits, built at "
                               "load; exact mode is then exact to that precision's greedy output")
    generation_int8_activations: bool = Field(
        False, description="int4 weights: compute with int8 activations too (faster, as llama.cpp does; int8 "
                           "weights always do); exact mode is then refused (one row and several round differently)")
    generation_fused_segments: bool = Field(
        True, description="onnxruntime runner on cpu: the layers between two exits run as one call with attention "
                          "in the graph, for one sequence or a batch in the KV pool (faster; holds a second copy of "
                          "the layer weights)")
    generation_kv_pool: bool = Field(
        True, description="fused segments: the running sequences' KV caches are slots of one pool, so a decoding "
                          "step of many streams runs each segment as one batched call (reserves address space for "
                          "max_running x max_context positions; memory is used only as positions are written)")
    generation_lookup_ngram: int = Field(
        DEFAULT_LOOKUP_NGRAM, ge=0, le=16,
        description="greedy early and exact modes: when the last n tokens (n from this down to 2) occurred earlier "
                    "in the prompt or the answer, draft the tokens that followed them and verify them in one "
                    "full-depth pass (prompt lookup decoding; 0 = off)")
    generation_lookup_history: int = Field(
        DEFAULT_LOOKUP_HISTORY, ge=0, le=1 << 20,
        description="tokens of the latest finished answers kept for lookup drafts when a sequence's own text has "
                    "no match (answers to similar requests share phrasing; drafts are verified, so no other "
                    "request's text reaches an answer, only its speed depends on them; 0 = off)")
    generation_lookup_max_batch: int = Field(
        1, ge=1, description="lookup drafts only while at most this many sequences decode together (alone, draft "
                             "rows are nearly free; in a batch they compete with the other sequences' rows)")
    cuda_graphs: bool = Field(True, description="runner torch with provider cuda: replay each span of segments as a "
                                                "CUDA graph per batch-size bucket (one launch instead of hundreds)")
    cuda_graph_buckets: list[PositiveInt] = Field(
        [1, 4, 16, 64], min_length=1, description="batch sizes captured as CUDA graphs: a batch runs in the smallest "
                                                  "that holds it, above the largest without a graph")
    continuous_batching: bool = Field(
        False, description="segment-level continuous batching: a batch's survivors run on together with the next "
                           "batches' samples at every segment (fuller segment batches; pays on a GPU)")
    warmup_batch_sizes: list[int] | None = Field(
        None, description="batch sizes run once before /readyz (default: powers of two up to max_batch_size)")
    api_key: str | None = Field(None, description="require this key (X-Api-Key or Bearer) on every route but health, metrics, docs")
    admin_api_key: str | None = Field(None, description="key for the admin routes (hot reload); unset = admin routes off")
    bundle_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="directories a reload path must lie under (default: those holding the served bundles)")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted Host header names, comma-separated (empty: any)")
    max_header_bytes: int = Field(16384, ge=1024, description="request line and headers, in bytes, before 431")
    max_headers: int = Field(100, ge=8, description="header fields per request before 431")
    header_timeout_s: float = Field(10.0, gt=0.0, description="close a connection whose request headers take longer "
                                    "(idle connections that never send a byte included)")
    keep_alive_timeout_s: float = Field(5.0, gt=0.0, description="close a kept-alive connection idle this long")
    decision_store: Literal["memory", "redis"] = Field(
        "memory", description="where decisions for labelled feedback are kept: this process, or Redis (shared by replicas)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for decision_store=redis")
    # Online accuracy monitoring (issue 8). Decisions kept per model for labelled feedback: the last
    # `feedback_capacity` samples (22 bytes each plus ~100 per request and its id) for at most the TTL.
    feedback_capacity: int = Field(100_000, ge=0, description="samples of recent decisions kept per model; 0 = no feedback")
    feedback_ttl_s: float = Field(3600.0, gt=0.0, description="feedback for a request older than this is 'unknown'")
    feedback_log: Path | None = Field(None, description="append decisions joined with labels here (JSON lines)")
    token_budget: int = Field(4096, ge=1, description="text models: a batch above this many (padded) tokens runs as "
                              "length-sorted pieces, each padded to its own longest text")
    shadow_fraction: float = Field(0.0, ge=0.0, le=1.0, description="share of early-exited samples also run to the last exit")
    log_level: str = Field("info", description="debug, info, warning or error")

    @field_validator("bundle_roots", "allowed_hosts", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        # "a,b" from the environment, or ["a,b", "c"] from the command line: the same list either way
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str | Path) for v in items):
            return [p.strip() for item in items for p in str(item).split(",") if p.strip()]
        return value

    @field_validator("bundles", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        if isinstance(value, str):
            if value.startswith("["):
                import json

                return json.loads(value)
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("default_policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        # Refused at start-up: a misspelt default would start a "ready" server that refuses every request.
        if value not in POLICIES:
            raise ValueError(f"unknown policy {value!r}; choose from {', '.join(POLICIES)}")
        return value

    @field_validator("api_key", "admin_api_key")
    @classmethod
    def _usable_key(cls, value: str | None) -> str | None:
        # Refused at start-up: such a key can never match (header values arrive stripped, in ASCII), so a
        # "ready" server would answer 401 to everyone; an empty one would silently turn the keys off.
        if value is None:
            return value
        if not value:
            raise ValueError("empty; unset it to serve without a key, or set a key")
        if value != value.strip():
            raise ValueError("has leading or trailing whitespace, which no client can send (header values are stripped)")
        if not (value.isascii() and value.isprintable()):
            raise ValueError("holds non-ASCII or control characters, which no client can send in a header")
        return value

    def short_keys(self) -> list[str]:
        """Names of the configured keys shorter than MIN_KEY_CHARS (warned about at start-up)."""
        return [name for name in ("api_key", "admin_api_key")
                if (key := getattr(self, name)) is not None and len(key) < MIN_KEY_CHARS]

    def reload_roots(self) -> list[Path]:
        """Resolved directories a reload may load from."""
        roots = self.bundle_roots or [Path(b).resolve().parent for b in self.bundles]
        return [Path(r).resolve() for r in roots]

    def queued_samples_limit(self) -> int:
        return self.queue_samples or 8 * self.max_batch_size

    def warmup_sizes(self) -> list[int]:
        if self.warmup_batch_sizes:
            return sorted(set(self.warmup_batch_sizes))
        sizes, n = [], 1
        while n < self.max_batch_size:
            sizes.append(n)
            n *= 2
        return [*sizes, self.max_batch_size]
