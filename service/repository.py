"""Served models: a bundle, its runner, engine and batcher, under a model name."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from calibration import Calibration
from models.bundle import Bundle, BundleError, load_bundle
from service.batcher import DynamicBatcher, ItemResult
from service.engine import ExitEngine
from service.metrics import Metrics
from service.runner import OnnxRunner, RunnerOptions
from service.settings import Settings

log = logging.getLogger("exitserve.repository")


class UnknownModel(KeyError):
    def __str__(self) -> str:
        return f"unknown model {self.args[0]!r}"


class ServedModel:
    def __init__(self, bundle: Bundle, settings: Settings, metrics: Metrics):
        if bundle.calibration is None:
            raise BundleError(f"{bundle.path / 'calibration.json'}: missing; run `exitserve calibrate {bundle.path} --data ...`")
        self.bundle = bundle
        self.name = bundle.manifest.name
        self.manifest = bundle.manifest
        try:
            self.calibration = Calibration.from_dict(bundle.calibration, num_exits=bundle.manifest.num_exits)
        except ValueError as exc:
            raise BundleError(f"{bundle.path / 'calibration.json'}: {exc}") from exc
        options = RunnerOptions(
            provider=settings.provider, device_id=settings.device_id, thread_pool=settings.thread_pool,
            threads=settings.threads, spinning=settings.spinning, graph_optimization=settings.graph_optimization,
        )
        self.runner = OnnxRunner(bundle, options=options)
        self.engine = ExitEngine(self.runner, self.calibration)
        self.compute_fractions = np.asarray(bundle.manifest.compute_fractions())
        self.labels = np.asarray(bundle.manifest.labels, dtype=object)
        self.sample_shape = tuple(bundle.manifest.input.shape[1:])
        self.input_dtype = np.dtype(bundle.manifest.input.dtype)
        self.metrics = metrics
        self.ready = False
        self.batcher = DynamicBatcher(
            self.engine,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
            queue_limit=settings.queue_limit,
            workers=settings.workers,
            name=self.name,
            on_batch=self._observe_batch,
            on_result=self._observe_result,
            segment_timer=self._observe_segment,
        )
        self._segment_histograms = [
            metrics.segment_duration.labels(self.name, str(k)) for k in range(bundle.manifest.num_exits)
        ]
        self._exit_counters = [metrics.exits.labels(self.name, str(k)) for k in range(bundle.manifest.num_exits)]
        self._requested_delta = metrics.requested_delta.labels(self.name)
        metrics.target_missed.labels(self.name)  # the series exists at 0 before the first miss

    def start(self, warmup_sizes: list[int]) -> None:
        self.runner.warmup(warmup_sizes)
        self.batcher.start()
        self.ready = True
        self.metrics.model_ready.labels(self.name).set(1)

    def stop(self, timeout: float) -> bool:
        self.ready = False
        self.metrics.model_ready.labels(self.name).set(0)
        return self.batcher.close(timeout)

    # --- metrics hooks (engine threads) -----------------------------------------------------------

    def _observe_segment(self, k: int, seconds: float) -> None:
        self._segment_histograms[k].observe(seconds)

    def _observe_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.labels(self.name).observe(size)

    def _observe_result(self, result: ItemResult, deltas: np.ndarray) -> None:
        m, name = self.metrics, self.name
        for delta in deltas.tolist():
            self._requested_delta.observe(delta)
        m.queue_duration.labels(name).observe(max(result.queue_seconds, 0.0))
        counts = np.bincount(result.exit_index, minlength=len(self._exit_counters))
        depth, fraction, estimate = m.exit_depth.labels(name), m.compute_fraction.labels(name), m.estimated_accuracy.labels(name)
        for k, count in enumerate(counts):
            if count:
                self._exit_counters[k].inc(int(count))
        for k, est in zip(result.exit_index.tolist(), result.estimate.tolist(), strict=True):
            depth.observe(k)
            fraction.observe(self.compute_fractions[k])
            estimate.observe(est)
        missed = int((~result.target_met).sum())
        if missed:
            m.target_missed.labels(name).inc(missed)


class ModelRepository:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, ServedModel] = {}
        self._lock = threading.Lock()

    def load(self, paths: list[Path]) -> None:
        for path in paths:
            model = ServedModel(load_bundle(path, require_calibration=True), self.settings, self.metrics)
            if model.name in self.models:
                raise BundleError(f"{path}: a model named {model.name!r} is already loaded")
            self.models[model.name] = model
            self.metrics.model_ready.labels(model.name).set(0)
            log.info("loaded bundle", extra={"model": model.name, "path": str(path)})

    def start(self) -> None:
        for model in self.models.values():
            model.start(self.settings.warmup_sizes())

    def stop(self, timeout: float) -> bool:
        return all([model.stop(timeout) for model in self.models.values()])

    def get(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise UnknownModel(name)
        return model

    @property
    def ready(self) -> bool:
        return bool(self.models) and all(m.ready for m in self.models.values())
