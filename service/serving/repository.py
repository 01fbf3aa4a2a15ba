"""Served models: a bundle, its runner, engine and batcher, under a model name.

Hot reload (`ModelRepository.reload`): the new model is built and warmed up off the event loop
while the old one keeps serving; then the dict entry is swapped (one atomic store) and the old
batcher drains. A request that picked the old model before the swap but submits after its batcher
closed is handed to the successor (when it takes the same inputs and gives the same labels), so a
good reload fails no request. A bad bundle raises BadBundle and leaves the old model untouched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from pathlib import Path

import numpy as np

from exitserve.calibration import POLICIES, Calibration
from exitserve.errors import BadBundle, Conflict, NotFound
from exitserve.models.bundle import Bundle, load_bundle
from exitserve.service.monitoring.metrics import Metrics
from exitserve.service.monitoring.monitor import ModelMonitor
from exitserve.service.runners.base import RunnerOptions, SegmentRunner, create_runner
from exitserve.service.runners.onnx_runtime import OnnxRunner
from exitserve.service.serving.batcher import DynamicBatcher, ShuttingDown, WorkItem
from exitserve.service.serving.engine import ExitEngine
from exitserve.service.serving.observer import ModelObserver
from exitserve.service.serving.text_input import TextTokenizer
from exitserve.service.settings import Settings

log = logging.getLogger("exitserve.repository")


class UnknownModel(NotFound):
    def __init__(self, name: str):
        super().__init__(f"unknown model {name!r}")


class ServedModel:
    def __init__(self, bundle: Bundle, settings: Settings, metrics: Metrics):
        if bundle.calibration is None:
            raise BadBundle(f"{bundle.path / 'calibration.json'}: missing; run `exitserve calibrate {bundle.path} --data ...`")
        self.bundle = bundle
        self.name = bundle.manifest.name
        self.manifest = bundle.manifest
        try:
            self.calibration = Calibration.from_dict(bundle.calibration, num_exits=bundle.manifest.num_exits)
        except ValueError as exc:
            raise BadBundle(f"{bundle.path / 'calibration.json'}: {exc}") from exc
        options = RunnerOptions(
            provider=settings.provider, device_id=settings.device_id, thread_pool=settings.thread_pool,
            threads=settings.threads, spinning=settings.spinning, graph_optimization=settings.graph_optimization,
            large_batch_threads=settings.large_batch_threads, large_batch_rows=settings.large_batch_rows,
        )
        self.runner: SegmentRunner = create_runner(
            bundle, settings.runner, options, settings.cuda_graph_buckets if settings.cuda_graphs else None)
        if isinstance(self.runner, OnnxRunner):
            _check_logits_width(self.runner, bundle)
        # Decision records, feedback scoring and shadow checks (issue 8); the engine traces every
        # exit only when a feedback log wants it.
        self.monitor = ModelMonitor(self.name, bundle.manifest.version, self.calibration, metrics, settings)
        self.engine = ExitEngine(self.runner, self.calibration, shadow_fraction=settings.shadow_fraction,
                                 trace=self.monitor.trace, token_budget=settings.token_budget)
        self.compute_fractions = np.asarray(bundle.manifest.compute_fractions())
        self.labels = np.asarray(bundle.manifest.labels, dtype=object)
        self.sample_shape = tuple(bundle.manifest.input.shape[1:])
        self.input_dtype = np.dtype(bundle.manifest.input.dtype)
        self.tokenizer = TextTokenizer(bundle) if bundle.manifest.input.text else None
        self.metrics = metrics
        if self.calibration.input_guard is not None and self.engine.input_guard is None:
            log.warning("model %r: its calibration has an input guard but the %s runner gives no features: "
                        "answers are not guarded", self.name, settings.runner)
        self.ready = False
        self.started = False  # batcher threads running
        self.successor: ServedModel | None = None  # set when a reload replaces this model
        self.batcher = DynamicBatcher(
            self.engine,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
            queue_limit=settings.queue_limit,
            workers=settings.workers,
            name=self.name,
            observer=ModelObserver(self.name, self.compute_fractions, metrics, self.monitor, settings.max_batch_size),
            queue_samples=settings.queued_samples_limit(),
            deadline_s=settings.request_timeout_s,
            continuous=settings.continuous_batching,
        )

    def trust(self) -> dict:
        """What this model's promise rests on, for the model listings: schema, guarded policies, input guard."""
        guard = self.engine.input_guard
        return {
            "calibration_schema": self.calibration.schema_version,
            "guarded_policies": [p for p in POLICIES if self.calibration.guards(p)],
            "input_guard": None if guard is None else {"score": "pooled-mahalanobis", "features": guard.features,
                                                       "withheld_on_calibration": round(1.0 - guard.quantile, 6)},
        }

    def start(self, warmup_sizes: list[int]) -> None:
        self.runner.warmup(warmup_sizes)
        self.batcher.start()
        self.started = True
        self.ready = True
        self.metrics.model_ready.labels(self.name).set(1)

    def stop(self, timeout: float) -> bool:
        self.ready = False
        self.metrics.model_ready.labels(self.name).set(0)
        # A model whose warm-up never ran (or failed) has no threads to join.
        return self.batcher.close(timeout) if self.started else True

    def submit(self, item: WorkItem) -> None:
        """Queue a request; once retired by a reload, hand it to the successor instead of refusing it."""
        try:
            self.batcher.submit(item)
        except ShuttingDown:
            successor = self.successor
            if successor is None:
                raise
            if not successor.accepts_requests_of(self):
                # Validated against inputs or labels that no longer exist: the client must ask again.
                raise ShuttingDown(f"model {self.name!r} was reloaded with other inputs or labels; "
                                   "send the request again") from None
            successor.submit(item)

    def abandon(self, item: WorkItem) -> None:
        """Drop a queued request (client gone, deadline passed), wherever it was handed on to."""
        model: ServedModel | None = self
        while model is not None:
            model.batcher.abandon(item)
            model = model.successor

    def accepts_requests_of(self, other: ServedModel) -> bool:
        """True when a request validated (and to be answered) against `other` is valid here too."""
        return (self.sample_shape == other.sample_shape and self.input_dtype == other.input_dtype
                and self.manifest.labels == other.manifest.labels
                and self.compute_fractions.tolist() == other.compute_fractions.tolist()
                and self._tokenizer_identity() == other._tokenizer_identity())

    def _tokenizer_identity(self) -> tuple[object, str | None]:
        """Token ids made by one tokenizer mean nothing to another."""
        text = self.manifest.input.text
        return text, self.manifest.sha256.get(text.tokenizer) if text else None

    def retire(self, successor: ServedModel, timeout: float) -> bool:
        """After a reload: route late submits to `successor`, drain the accepted ones, stop the threads.

        The ready gauge is left alone: it belongs to the name, which the successor now serves."""
        self.successor = successor  # before closing, so no submit sees a closed batcher without a successor
        return self.batcher.close(timeout)


def release_memory() -> None:
    """Collect garbage and return free heap pages to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Return free heap pages to the OS (glibc keeps them otherwise: a big request's body and
    tensors would stay in the RSS after it is answered). ctypes releases the GIL meanwhile."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def _check_logits_width(runner: OnnxRunner, bundle: Bundle) -> None:
    """Every exit must score exactly the manifest's labels (a relabelled manifest would mislabel answers)."""
    width = len(bundle.manifest.labels)
    for k, (session, spec) in enumerate(zip(runner.sessions, bundle.manifest.segments, strict=True)):
        shape = next(o.shape for o in session.get_outputs() if o.name == spec.logits)
        if shape and isinstance(shape[-1], int) and shape[-1] != width:
            raise BadBundle(f"{bundle.segment_path(k)}: exit {k} scores {shape[-1]} classes but the manifest "
                              f"lists {width} labels")


class ReloadRefused(Conflict):
    """A reload that cannot start now (the model is still warming up)."""


class ModelRepository:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, ServedModel] = {}
        self.paths: dict[str, Path] = {}  # where each model was loaded from: the default for a reload
        self._lock = threading.Lock()  # one reload at a time
        self.reloads = metrics.model_reloads

    def build(self, path: Path) -> ServedModel:
        return ServedModel(load_bundle(path, require_calibration=True), self.settings, self.metrics)

    def load(self, paths: list[Path]) -> None:
        for path in paths:
            model = self.build(path)
            if model.name in self.models:
                raise BadBundle(f"{path}: a model named {model.name!r} is already loaded")
            self.models[model.name] = model
            self.paths[model.name] = Path(path)
            self.metrics.model_ready.labels(model.name).set(0)
            for outcome in ("ok", "error"):
                self.reloads.labels(model.name, outcome)
            log.info("loaded bundle", extra={"model": model.name, "path": str(path)})

    def reload(self, name: str, path: Path | None = None) -> ServedModel:
        """Replace model `name` by the bundle at `path` (default: where it came from). Blocking: call
        it off the event loop. Raises UnknownModel, ReloadRefused, or BadBundle (old model kept)."""
        try:
            return self._reload(name, path)
        finally:
            # The retired (or refused) model is unreachable once _reload's frame is gone: collect any
            # cycles now and hand the freed heap back to the OS. Without the trim, glibc keeps each
            # retired model's ONNX Runtime arenas (tens of MB per reload, every reload).
            release_memory()

    def _reload(self, name: str, path: Path | None) -> ServedModel:
        with self._lock:
            old = self.get(name)
            if not old.ready:
                raise ReloadRefused(f"model {name!r} is still warming up; retry when /readyz is 200")
            source = Path(path) if path is not None else self.paths[name]
            started = time.perf_counter()
            try:
                new = self._build_warm(source, name)
            except BadBundle:
                self.reloads.labels(name, "error").inc()
                raise
            new.monitor.adopt(old.monitor)  # feedback for requests the old model answered still scores
            self.models[name] = new  # the swap: one dict store, atomic under the GIL
            self.paths[name] = source
            drained = old.retire(new, self.settings.drain_timeout_s)
            self.reloads.labels(name, "ok").inc()
            log.info("reloaded model", extra={"model": name, "path": str(source), "drained": drained,
                                              "seconds": round(time.perf_counter() - started, 3)})
            return new

    def _build_warm(self, source: Path, name: str) -> ServedModel:
        try:
            new = self.build(source)
        except BadBundle:
            raise
        except Exception as exc:  # anything else a broken bundle can raise must not escape as a 500
            raise BadBundle(f"{source}: cannot load ({type(exc).__name__}: {exc})") from exc
        if new.name != name:
            raise BadBundle(f"{source}: the bundle is named {new.name!r}, not {name!r}")
        try:
            new.start(self.settings.warmup_sizes())  # warm before the swap: the first request after it is fast
        except Exception as exc:
            raise BadBundle(f"{source}: warm-up failed ({type(exc).__name__}: {exc})") from exc
        return new

    def reload_all(self) -> dict[str, str | None]:
        """Reload every model from its directory (SIGHUP): name -> None, or the error. Never raises."""
        outcome: dict[str, str | None] = {}
        for name in list(self.models):
            try:
                self.reload(name)
                outcome[name] = None
            except (BadBundle, ReloadRefused) as exc:
                outcome[name] = str(exc)
                log.error("reload failed; the old model keeps serving", extra={"model": name, "error": str(exc)})
        return outcome

    def start(self) -> None:
        for model in self.models.values():
            model.start(self.settings.warmup_sizes())

    def stop(self, timeout: float) -> bool:
        with self._lock:  # a reload under way finishes first, so its new model is stopped too
            return all([model.stop(timeout) for model in self.models.values()])

    def get(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise UnknownModel(name)
        return model

    @property
    def ready(self) -> bool:
        return bool(self.models) and all(m.ready for m in self.models.values())
