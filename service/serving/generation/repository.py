"""The generation models a server holds (torch is imported only when one is loaded)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from exitserve.errors import BadBundle
from exitserve.service.settings import Settings

log = logging.getLogger("exitserve.generation")


def is_generation_bundle(path: Path) -> bool:
    """Cheap check of manifest.json alone, so the classifier repository never sees a generation bundle."""
    try:
        return json.loads((Path(path) / "manifest.json").read_text()).get("task") == "text-generation"
    except (OSError, ValueError, AttributeError):
        return False


def split_bundles(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(classifier bundles, generation bundles) in their given order."""
    generation = [p for p in paths if is_generation_bundle(p)]
    return [p for p in paths if p not in generation], generation


def choose_runner(setting: str, device: str) -> str:
    """`auto`: ONNX Runtime on CPU (measured faster there), torch on CUDA (ONNX Runtime's CUDA path has
    not run on a GPU yet); an explicit choice stands."""
    if setting != "auto":
        return setting
    return "torch" if device == "cuda" else "onnxruntime"


class GenerationRepository:
    def __init__(self, settings: Settings, registry, *, kv_strategy: str = "recompute", max_running: int = 16,
                 queue_limit: int = 64, max_tokens_limit: int = 1024, ready_gauge=None):
        self.settings = settings
        self.ready_gauge = ready_gauge  # exitserve_model_ready, shared with the classifiers (the dashboard's model list)
        self.registry = registry
        self.kv_strategy = kv_strategy
        self.max_running = max_running
        self.queue_limit = queue_limit
        self.max_tokens_limit = max_tokens_limit
        self.models: dict = {}

    def load(self, paths: list[Path]) -> None:
        if not paths:  # classifiers only: the serving path stays free of torch
            return
        try:
            import torch
        except ModuleNotFoundError:
            raise BadBundle(f"{paths[0]}: serving a generation bundle needs the `llm` extra: "
                              "pip install 'exitserve[llm]'") from None

        from exitserve.service.serving.generation.model import load_generation_model  # torch from here on

        # Decoding runs batch-1-sized matmuls: on a shared CPU two threads wait on each other far more
        # than they help (a SmolLM2 layer: 2 ms with 1 thread, 20 ms with 2 on this loaded machine).
        torch.set_num_threads(self.settings.threads)

        device = "cuda" if self.settings.provider == "cuda" else "cpu"
        runner = choose_runner(self.settings.generation_runner, device)
        for path in paths:
            try:
                model = load_generation_model(Path(path), self.registry, device=device, kv_strategy=self.kv_strategy,
                                              max_running=self.max_running, queue_limit=self.queue_limit,
                                              runner=runner, threads=self.settings.threads,
                                              precision=self.settings.generation_weights,
                                              int8_activations=self.settings.generation_int8_activations,
                                              fuse_segments=self.settings.generation_fused_segments,
                                              kv_pool=self.settings.generation_kv_pool,
                                              lookup_ngram=self.settings.generation_lookup_ngram,
                                              lookup_history=self.settings.generation_lookup_history,
                                              lookup_max_batch=self.settings.generation_lookup_max_batch)
            except BadBundle:
                raise
            except Exception as exc:
                raise BadBundle(f"{path}: cannot load the generation bundle ({type(exc).__name__}: {exc})") from exc
            if model.name in self.models:
                raise BadBundle(f"{path}: a model named {model.name!r} is already loaded")
            self.models[model.name] = model
            log.info("loaded generation bundle", extra={"model": model.name, "path": str(path)})

    def start(self) -> None:
        for model in self.models.values():
            model.start()
            if self.ready_gauge is not None:
                self.ready_gauge.labels(model.name).set(1)

    def stop(self, timeout: float) -> bool:
        if self.ready_gauge is not None:
            for name in self.models:
                self.ready_gauge.labels(name).set(0)
        return all([model.stop(timeout) for model in self.models.values()])

    @property
    def ready(self) -> bool:
        return all(m.ready for m in self.models.values())

    def default_name(self) -> str | None:
        return next(iter(self.models), None)
