"""The MiniLM multi-exit text model: encoder parity, padding, the exported bundle, head training."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub here

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from exitserve.models.bundle import load_bundle
from exitserve.models.text import minilm_dir, pooled_features, text_multi_exit_net
from exitserve.models.text_training import HeadTraining, load_tokenizer, train_text_heads
from exitserve.models.tokens import length_batches, pad_batch, token_ids

TEXTS = ["A wonderful, moving film.", "dull", "The quick brown fox jumps over the lazy dog, again and again and again."]


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201
    return load_tokenizer()


def test_our_encoder_matches_sentence_transformers_with_padding(tokenizer) -> None:  # noqa: ANN001
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(TEXTS, convert_to_tensor=True)
    net = text_multi_exit_net(2)
    ids = torch.from_numpy(pad_batch(token_ids(tokenizer, TEXTS)))
    assert (ids == 0).any(), "the batch must contain padding"
    ours = torch.nn.functional.normalize(pooled_features(net, ids)[-1], dim=1)
    assert torch.max(torch.abs(ours - reference)).item() < 1e-5


def test_padding_does_not_change_any_exit(tokenizer) -> None:  # noqa: ANN001
    net = text_multi_exit_net(2, num_layers=3)
    rows = token_ids(tokenizer, TEXTS)
    padded = net(torch.from_numpy(pad_batch(rows)))
    for i, row in enumerate(rows):
        alone = net(torch.tensor([row]))
        for k in range(net.num_exits):
            assert torch.allclose(alone[k][0], padded[k][i], atol=1e-5)


def test_token_helpers(tokenizer) -> None:  # noqa: ANN001
    long_text = "word " * 400
    rows = token_ids(tokenizer, ["", long_text], max_length=256)
    assert rows[0] == [101, 102]  # [CLS] [SEP]
    assert len(rows[1]) == 256 and rows[1][-1] == 102  # cut, [SEP] kept
    batch = pad_batch([[1, 2, 3], [4]], pad_id=0)
    assert batch.tolist() == [[1, 2, 3], [4, 0, 0]]
    lengths = np.array([5, 300, 3, 40, 7, 7])
    groups = length_batches(lengths, max_tokens=320)
    assert sorted(np.concatenate(groups).tolist()) == list(range(6))
    assert all(len(g) * lengths[g].max() <= 320 or len(g) == 1 for g in groups)


def test_text_bundle_has_tokenizer_and_dynamic_sequence_axes(text_bundle: Path) -> None:
    bundle = load_bundle(text_bundle, require_calibration=True)
    spec = bundle.manifest.input
    assert spec.dtype == "int64" and spec.shape == [-1, -1]
    assert spec.text is not None and spec.text.max_length == 256 and spec.text.tokenizer in bundle.manifest.sha256
    first = ort.InferenceSession(str(bundle.segment_path(0)), providers=["CPUExecutionProvider"])
    for length in (1, 5, 256):
        ids = np.full((3, length), 2307, np.int64)
        hidden, mask, logits, features = first.run(None, {"input_ids": ids})
        assert hidden.shape == (3, length, 384) and mask.shape == (3, length) and logits.shape == (3, 2)
        # the input guard's tap (`exitserve calibrate` added it): the mean over the real tokens
        np.testing.assert_allclose(features, hidden.mean(axis=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("targets", ["self-supervised", "labels"])
def test_head_training_on_encoder_features(targets: str) -> None:
    """Separable synthetic features: the final head learns the labels; the exit head, on a noisier
    view of the same features, learns its targets (the final's predictions, or the labels)."""
    rng = np.random.default_rng(0)
    n, width = 3200, 384
    direction = rng.normal(size=width).astype(np.float32)
    features = rng.normal(size=(2, n, width)).astype(np.float32)
    features[0] = features[1] + 0.5 * rng.normal(size=(n, width)).astype(np.float32)
    y = (features[1] @ direction > 0).astype(np.int64)
    net = text_multi_exit_net(2, num_layers=2)
    report = train_text_heads(net, features[:, :3000], y[:3000], features[:, 3000:], y[3000:], targets,
                              HeadTraining(epochs=10, lr=3e-3))
    assert report.targets == targets
    assert report.val_accuracy[-1] > 0.85
    assert report.agreement_with_final[-1] == 1.0
    assert report.agreement_with_final[0] > 0.8 and report.val_accuracy[0] > 0.8
