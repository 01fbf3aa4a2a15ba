"""Offline work on a bundle: `exitserve calibrate` and `exitserve evaluate`.

Both run the bundle's ONNX segments over a data set to full depth (every exit's logits for every
sample), then hand the logits to the calibration package: fitting writes calibration.json into the
bundle and re-signs it; evaluation sweeps δ for every policy and writes JSON, markdown and plots.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from exitserve.calibration import Calibration, fit_calibration
from exitserve.calibration.evaluation import DEFAULT_EVAL_DELTAS, evaluate_policies, render_markdown
from exitserve.calibration.fitting import InputFeatures
from exitserve.calibration.input_guard import DEFAULT_QUANTILE
from exitserve.calibration.io import dumps, save_calibration
from exitserve.errors import InvalidInput
from exitserve.models.bundle import CALIBRATION_FILE, Bundle, load_bundle, refresh_checksums
from exitserve.models.data import Dataset, load_dataset
from exitserve.models.tokens import length_batches, pad_batch, token_ids

if TYPE_CHECKING:
    from exitserve.service.runners.base import Provider, SegmentRunner

EVALUATION_JSON = "evaluation.json"
EVALUATION_MD = "evaluation.md"
PLOTS_EXTRA = "plots"  # `pip install 'exitserve[plots]'` adds matplotlib


def plots_available() -> bool:
    """matplotlib is an extra: without it evaluate writes everything but the PNG plots."""
    return importlib.util.find_spec("matplotlib") is not None


def _command_line() -> str:
    """This process's command line, with `python -m service.cli` shown as the `exitserve` it is."""
    program = Path(sys.argv[0]).name
    if program in ("cli.py", "__main__.py", "exitserve"):
        program = "exitserve"
    return " ".join([program, *sys.argv[1:]])


def load_bundle_data(bundle: Bundle, data_spec: str) -> Dataset:
    """Load `name:split` or an .npz for this bundle, checked against its input shape and labels.

    Built-in splits use the bundle's own train/validation split seed, so `name:val` is the data
    that was held out when the bundle was trained.
    """
    extra = bundle.manifest.created_by.extra
    data = load_dataset(data_spec, seed=int(extra.get("split_seed") or 0))
    if data_spec.endswith(":train"):
        warnings.warn(f"{data_spec}: this is the training split; tables fitted on it over-promise", stacklevel=2)
    expected_val = extra.get("val_fingerprint")
    if data_spec.endswith(":val") and expected_val and data.fingerprint != expected_val:
        warnings.warn(f"{data_spec}: fingerprint {data.fingerprint} differs from the validation split recorded "
                      f"at training ({expected_val}); is this really held-out data?", stacklevel=2)
    spec = bundle.manifest.input
    if spec.text is not None:
        if data.x.dtype != object:
            raise ValueError(f"{data_spec}: {bundle.manifest.name} is a text model; give a text data set (sst2, agnews)")
        _check_labels(bundle, data, data_spec)
        return data
    want = spec.shape[1:]
    have = list(data.x.shape[1:])
    if len(want) != len(have) or any(w not in (-1, h) for w, h in zip(want, have, strict=True)):
        raise ValueError(f"{data_spec}: inputs have shape {[-1, *have]} but the bundle expects {spec.shape} ({spec.name})")
    _check_labels(bundle, data, data_spec)
    return data


def _check_labels(bundle: Bundle, data: Dataset, data_spec: str) -> None:
    num_labels = len(bundle.manifest.labels)
    if len(data.y) == 0:
        raise ValueError(f"{data_spec}: no samples")
    if data.y.min() < 0 or data.y.max() >= num_labels:
        raise ValueError(f"{data_spec}: labels {data.y.min()}..{data.y.max()} outside the bundle's {num_labels} classes")


def bundle_logits(
    bundle: Bundle, x: np.ndarray, *, provider: Provider = "cpu", threads: int = 2, batch_size: int = 256, progress: bool = True
) -> list[np.ndarray]:
    """Every exit's logits for every row of x, from the bundle's ONNX segments."""
    return bundle_outputs(bundle, x, provider=provider, threads=threads, batch_size=batch_size, progress=progress)[0]


def bundle_outputs(
    bundle: Bundle, x: np.ndarray, *, provider: Provider = "cpu", threads: int = 2, batch_size: int = 256, progress: bool = True
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Every exit's logits for every row of x, and the features tap's values (None where the bundle has none)."""
    from exitserve.service.runners.onnx_runtime import (
        OnnxRunner,  # onnxruntime loads only when a command needs it
    )

    runner = OnnxRunner(bundle, provider=provider, threads=threads)
    if bundle.manifest.input.text is not None:
        return _text_logits(runner, bundle, x, progress)
    return runner.run_all_exits_with_features(np.ascontiguousarray(x, dtype=np.dtype(bundle.manifest.input.dtype)),
                                              batch_size=batch_size, progress=progress)


def input_guard_verdict(calibration: Calibration, features: np.ndarray | None) -> np.ndarray | None:
    """The input guard's per-sample verdict as the server reaches it (None: no guard, or no features)."""
    guard = calibration.input_guard
    return None if guard is None or features is None else guard.in_distribution(features)


def _text_logits(runner: SegmentRunner, bundle: Bundle, texts: np.ndarray, progress: bool
                 ) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Tokenise with the bundle's tokenizer; run length-sorted batches (little padding); restore order."""
    from exitserve.service.serving.text_input import TextTokenizer

    spec = bundle.manifest.input.text
    assert spec is not None  # only text bundles come here
    rows = token_ids(TextTokenizer(bundle).tokenizer, [str(t) for t in texts], spec.max_length)
    lengths = np.array([len(r) for r in rows])
    if (cut := int((lengths >= spec.max_length).sum())):
        warnings.warn(f"{cut} texts reach the model's {spec.max_length}-token limit and were cut (the server refuses them)", stacklevel=2)
    out = [np.zeros((len(rows), len(bundle.manifest.labels)), np.float32) for _ in range(runner.num_exits)]
    features: np.ndarray | None = None
    for batch in tqdm(length_batches(lengths), desc="running segments", disable=not progress, unit="batch"):
        state = runner.start(pad_batch([rows[i] for i in batch], spec.pad_id))
        for k in range(runner.num_exits):
            state, logits = runner.run_segment(k, state)
            out[k][batch] = logits
            if k == 0 and (tapped := runner.take_features(state)) is not None:
                features = features if features is not None else np.zeros((len(rows), tapped.shape[1]), np.float32)
                features[batch] = tapped
    return out, features


@dataclass(frozen=True)
class Fitted:
    """A calibration fitted by `fit_bundle`, with the logits and labels it was fitted on."""

    calibration: Calibration
    logits: list[np.ndarray]
    labels: np.ndarray
    features: np.ndarray | None = None


def calibrate_bundle(bundle_dir: str | Path, data_spec: str, **options: Any) -> Calibration:
    """Fit calibration.json for a bundle on `data_spec` (e.g. "cifar10:val" or a .npz) and re-sign it.

    `options` are `fit_bundle`'s: provider, threads, batch_size, progress, use_labels (False calibrates
    self-supervised: agreement with the last exit), and what goes on to `calibration.fit_calibration`
    (confidence, bins, binning, window, alpha, delta_grid, fit_temperature). Returns the fitted
    Calibration; the bundle is verified again after writing.
    """
    return fit_bundle(bundle_dir, data_spec, **options).calibration


def fit_bundle(
    bundle_dir: str | Path,
    data_spec: str,
    *,
    provider: Provider = "cpu",
    threads: int = 2,
    batch_size: int = 256,
    progress: bool = True,
    use_labels: bool = True,
    input_guard: bool = True,
    guard_quantile: float = DEFAULT_QUANTILE,
    **fit_kwargs: Any,
) -> Fitted:
    """`calibrate_bundle`, also returning the held-out logits and labels (for the command's summary).

    `input_guard`: give the first segment the features tap (models.features, needs `onnx`) where it has
    none, and fit the input guard on the same samples (calibration.input_guard)."""
    directory = Path(bundle_dir)
    bundle = load_bundle(directory)
    if input_guard and bundle.manifest.segments[0].features is None:
        try:
            from exitserve.models.features import add_features_tap  # onnx: the `train` extra
        except ImportError:
            raise InvalidInput("the input guard adds a features output to the first segment, which needs onnx: "
                                  "pip install 'exitserve[train]', or calibrate with --no-input-guard") from None
        add_features_tap(directory)
        bundle = load_bundle(directory)
    data = load_bundle_data(bundle, data_spec)
    logits, features = bundle_outputs(bundle, data.x, provider=provider, threads=threads, batch_size=batch_size,
                                      progress=progress)
    tap = bundle.manifest.segments[0].features
    guard = InputFeatures(tap, features, guard_quantile) if input_guard and tap and features is not None else None
    calibration = fit_calibration(logits, data.y if use_labels else None, data_fingerprint=data.fingerprint,
                                  features=guard, **fit_kwargs)
    save_calibration(calibration, directory / CALIBRATION_FILE)
    refresh_checksums(directory)
    load_bundle(directory, require_calibration=True)  # what we wrote must load
    return Fitted(calibration, logits, data.y, features)


def evaluate_bundle(
    bundle_dir: str | Path,
    data_spec: str,
    out_dir: str | Path,
    *,
    provider: Provider = "cpu",
    threads: int = 2,
    batch_size: int = 256,
    progress: bool = True,
    deltas: Sequence[float] | None = None,
    command: str | None = None,
) -> dict:
    """Run the bundle once over labelled test data, sweep δ for every policy, write the reports.

    Writes out_dir/evaluation.json, evaluation.md and, when matplotlib is installed (the `plots`
    extra; see `plots_available`), reliability.png, accuracy_vs_delta.png and
    accuracy_vs_compute.png; returns the evaluation dict. `command` is recorded in the reports
    (default: this process's command line).
    """
    bundle = load_bundle(bundle_dir, require_calibration=True)
    manifest = bundle.manifest
    assert bundle.calibration is not None  # require_calibration
    calibration = Calibration.from_dict(bundle.calibration, num_exits=manifest.num_exits)
    data = load_bundle_data(bundle, data_spec)
    logits, features = bundle_outputs(bundle, data.x, provider=provider, threads=threads, batch_size=batch_size,
                                      progress=progress)
    report = evaluate_policies(calibration, logits, data.y, manifest.compute_fractions(),
                               DEFAULT_EVAL_DELTAS if deltas is None else deltas,
                               in_distribution=input_guard_verdict(calibration, features))
    source = {
        "bundle": f"{manifest.name} v{manifest.version}",
        "data": data_spec,
        "data_fingerprint": data.fingerprint,
        "command": command if command is not None else _command_line(),
    }
    if data.fingerprint == calibration.data_fingerprint:
        source["warning"] = "evaluated on the calibration data itself: results are optimistic"
    report = {"source": source, **report}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / EVALUATION_JSON).write_text(dumps(report) + "\n")
    (out / EVALUATION_MD).write_text(render_markdown(report, title=f"Evaluation of {manifest.name} on {data_spec}") + "\n")
    if plots_available():
        from exitserve.calibration.plots import write_plots  # matplotlib only when plotting

        write_plots(report, out)
    json.loads((out / EVALUATION_JSON).read_text())  # strict JSON (no NaN) or fail loudly here
    return report
