"""Train and export a multi-exit MiniLM text classifier (`exitserve train-text`).

The pretrained encoder stays frozen. The final classifier learns from the true labels; the exit
heads after layers 1-5 learn either self-supervised (`heads-only` regime of arXiv 2407.21082:
targets are the final exit's own predictions, loss CE - lambda * entropy) or from the labels, for
comparison. A frozen encoder means every head sees fixed inputs, so the encoder runs once per
sample and the heads train on its mean-pooled states (cached under runs/cache): the same result
as running the network every step, minutes instead of hours on two cores.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from exitserve.models.bundle import Manifest
from exitserve.models.net import MultiExitNet
from exitserve.models.text import (
    TOKENIZER_FILE,
    PooledClassifier,
    TextInputSegment,
    minilm_dir,
    pooled_features,
    text_multi_exit_net,
)
from exitserve.models.tokens import MAX_SEQUENCE_LENGTH, length_batches, pad_batch, token_ids
from exitserve.models.training import TrainConfig, exit_losses

HeadTargets = Literal["self-supervised", "labels"]


def load_tokenizer(model_dir: Path | None = None):  # noqa: ANN201 - tokenizers.Tokenizer
    """The encoder's WordPiece tokenizer with padding and truncation off (the server pads per batch)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str((model_dir or minilm_dir()) / TOKENIZER_FILE))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def encoder_features(net: MultiExitNet, tokenizer, texts: np.ndarray, cache: Path | None = None,  # noqa: ANN001
                     threads: int = 2) -> np.ndarray:
    """Mean-pooled states after every layer, [exits, samples, width] float32, cached by content."""
    key = hashlib.sha256("\n".join(map(str, texts)).encode()).hexdigest()[:16]
    path = cache / f"{key}-{net.num_exits}.npy" if cache else None
    if path is not None and path.is_file():
        return np.load(path)
    torch.set_num_threads(threads)
    rows = token_ids(tokenizer, [str(t) for t in texts])
    lengths = np.array([len(r) for r in rows])
    first_layer = _heads(net)[0].mlp[0]
    assert isinstance(first_layer, torch.nn.Linear)
    width = first_layer.in_features
    out = np.zeros((net.num_exits, len(rows), width), np.float32)
    for batch in tqdm(length_batches(lengths), desc="encoding", unit="batch"):
        ids = torch.from_numpy(pad_batch([rows[i] for i in batch]))
        for k, f in enumerate(pooled_features(net, ids)):
            out[k, batch] = f.numpy()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, out)
    return out


def _heads(net: MultiExitNet) -> list[PooledClassifier]:
    """The text model's exit heads, typed (a ModuleList only knows they are modules)."""
    heads = [h for h in net.heads if isinstance(h, PooledClassifier)]
    assert len(heads) == len(net.heads), "not a text model's heads"
    return heads


@dataclass
class HeadTraining:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    entropy_weight: float = 0.1
    seed: int = 0


@dataclass
class HeadReport:
    targets: str
    val_accuracy: list[float]
    agreement_with_final: list[float]
    seconds: float


def _fit_head(head: PooledClassifier, features: torch.Tensor, loss_of, config: HeadTraining) -> None:  # noqa: ANN001
    """Train one head's MLP on pooled features (the pooling itself has no parameters)."""
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * max(1, -(-len(features) // config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr, total_steps=steps)
    head.train()
    for _ in range(config.epochs):
        for idx in torch.randperm(len(features), generator=generator).split(config.batch_size):
            loss = loss_of(head.mlp(features[idx]), idx)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    head.eval()


def train_text_heads(net: MultiExitNet, train_features: np.ndarray, y_train: np.ndarray, val_features: np.ndarray,
                     y_val: np.ndarray, targets: HeadTargets, config: HeadTraining | None = None) -> HeadReport:
    """Final head on labels, then the exit heads on `targets`; per-exit validation accuracy."""
    config = config or HeadTraining()
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    feats = torch.from_numpy(train_features)
    labels = torch.from_numpy(y_train)
    heads = _heads(net)
    final = heads[-1]
    _fit_head(final, feats[-1], lambda z, idx: F.cross_entropy(z, labels[idx]), config)
    with torch.no_grad():
        final_logits = final.mlp(feats[-1])
    loss_config = TrainConfig(regime="heads-only", entropy_weight=config.entropy_weight)
    for k, head in enumerate(heads[:-1]):
        if targets == "self-supervised":
            # exit_losses' heads-only term: CE against the final exit's argmax, minus lambda * entropy
            def loss_of(z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
                return exit_losses([z, final_logits[idx]], labels[idx], "heads-only", "heads-only", loss_config)
        else:
            def loss_of(z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
                return F.cross_entropy(z, labels[idx])
        _fit_head(head, feats[k], loss_of, config)
    with torch.no_grad():
        val = torch.from_numpy(val_features)
        predictions = [head.mlp(val[k]).argmax(dim=1).numpy() for k, head in enumerate(heads)]
    return HeadReport(
        targets=targets,
        val_accuracy=[float((p == y_val).mean()) for p in predictions],
        agreement_with_final=[float((p == predictions[-1]).mean()) for p in predictions],
        seconds=time.perf_counter() - started,
    )


def export_text_bundle(net: MultiExitNet, tokenizer, out_dir: Path, labels: list[str], name: str,  # noqa: ANN001
                       example_texts: list[str], provenance: dict) -> tuple[Manifest, list[float]]:
    """Per-segment ONNX (dynamic batch and sequence axes) plus the tokenizer, parity-checked with padding."""
    from exitserve.models.export import export_bundle

    tokenizer_copy = out_dir.parent / f".{out_dir.name}-{TOKENIZER_FILE}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(tokenizer_copy))
    # Mixed lengths, so that the parity check (batch 1 and 7) runs with padding present.
    example = torch.from_numpy(pad_batch(token_ids(tokenizer, example_texts)))
    first = net.segments[0]
    assert isinstance(first, TextInputSegment)
    vocab_size = first.embeddings.word_embeddings.num_embeddings
    try:
        return export_bundle(
            net, example, out_dir, labels=labels, name=name, task="text-classification", input_name="input_ids",
            preprocessing={"tokenizer": TOKENIZER_FILE, "lowercase": True, "padding": "right, id 0"},
            data_fingerprint=provenance.get("train_fingerprint", ""), extra_provenance=provenance,
            text={"tokenizer": TOKENIZER_FILE, "max_length": MAX_SEQUENCE_LENGTH, "pad_id": 0, "vocab_size": vocab_size},
            extra_files={TOKENIZER_FILE: tokenizer_copy},
        )
    finally:
        tokenizer_copy.unlink(missing_ok=True)


def train_text_command(data: str, targets: HeadTargets, export: Path, name: str | None = None, layers: int | None = None,
                       train_limit: int | None = None, config: HeadTraining | None = None, cache: Path | None = None,
                       threads: int = 2, split_seed: int = 0, val_limit: int | None = None) -> HeadReport:
    """`exitserve train-text`: heads on the frozen encoder, then a verified bundle with the tokenizer."""
    from exitserve.models.data import load_dataset

    config = config or HeadTraining()
    train = load_dataset(f"{data}:train", seed=split_seed)
    if train_limit:
        train = type(train)(train.x[:train_limit], train.y[:train_limit], train.labels, f"{train.name}-first{train_limit}")
    val = load_dataset(f"{data}:val", seed=split_seed)
    if val_limit:  # the report's validation subset; calibration still uses the whole split
        val = type(val)(val.x[:val_limit], val.y[:val_limit], val.labels, f"{val.name}-first{val_limit}")
    net = text_multi_exit_net(len(train.labels), num_layers=layers, seed=config.seed)
    tokenizer = load_tokenizer()
    print(f"encoding {train.name} ({len(train)}) and {val.name} ({len(val)}) with the frozen encoder ({net.num_exits} layers)")
    train_features = encoder_features(net, tokenizer, train.x, cache, threads)
    val_features = encoder_features(net, tokenizer, val.x, cache, threads)
    report = train_text_heads(net, train_features, train.y, val_features, val.y, targets, config)
    print(f"heads ({targets}) trained in {report.seconds:.1f} s; validation accuracy per exit: "
          + " ".join(f"{a:.2%}" for a in report.val_accuracy)
          + "; agreement with the final exit: " + " ".join(f"{a:.2%}" for a in report.agreement_with_final))
    order = np.argsort([len(str(t)) for t in val.x])
    examples = [str(val.x[i]) for i in order[:: max(1, len(order) // 16)][:16]]
    provenance = {
        "architecture": f"all-MiniLM-L6-v2 (frozen, {net.num_exits} layers) + pooled MLP exit heads",
        "data": data, "split_seed": split_seed, "train_fingerprint": train.fingerprint,
        "val_fingerprint": val.fingerprint, "head_targets": targets, "head_training": vars(config),
        "val_accuracy": report.val_accuracy, "agreement_with_final": report.agreement_with_final,
    }
    manifest, worst = export_text_bundle(net, tokenizer, Path(export), train.labels, name or Path(export).name, examples, provenance)
    print(f"bundle {export}: {manifest.num_exits} exits; ONNX vs PyTorch max relative |diff| per segment (padding present): "
          + ", ".join(f"{d:.1e}" for d in worst))
    return report
