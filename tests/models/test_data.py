import gzip
import pickle
import struct

import numpy as np
import pytest

from exitserve.models.data import (
    load_cifar10_arrays,
    load_dataset,
    load_mnist_arrays,
    split_train_val,
)


def test_validation_split_is_disjoint_seeded_and_complete() -> None:
    train_a, val_a = split_train_val(100, 20, seed=3)
    train_b, val_b = split_train_val(100, 20, seed=3)
    _, val_c = split_train_val(100, 20, seed=4)
    assert np.array_equal(val_a, val_b) and np.array_equal(train_a, train_b)
    assert not np.array_equal(val_a, val_c)
    assert len(np.intersect1d(train_a, val_a)) == 0
    assert sorted(np.concatenate([train_a, val_a]).tolist()) == list(range(100))


def test_digits_splits_never_overlap() -> None:
    train = load_dataset("digits:train")
    val = load_dataset("digits:val")
    test = load_dataset("digits:test")
    assert train.x.dtype == np.float32 and train.x.shape[1:] == (1, 8, 8)
    assert train.x.min() >= 0.0 and train.x.max() <= 1.0
    assert len(train) + len(val) + len(test) == 1797
    assert train.fingerprint != val.fingerprint


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_layout(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 5], dtype=np.uint8)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    arrays = load_mnist_arrays(tmp_path)
    assert np.array_equal(arrays["x_test"], images)
    assert arrays["y_train"].tolist() == labels.tolist()


@pytest.mark.needs_data("mnist")
def test_shared_mnist_loads() -> None:
    data = load_dataset("mnist:val")
    assert data.x.shape == (5000, 1, 28, 28) and set(np.unique(data.y)) == set(range(10))


def test_cifar_binary_batches(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = np.concatenate([rng.integers(0, 10, (4, 1)), rng.integers(0, 256, (4, 3072))], axis=1)
        records.astype(np.uint8).tofile(tmp_path / name)
    arrays = load_cifar10_arrays(tmp_path)
    assert arrays["x_train"].shape == (20, 32, 32, 3) and arrays["y_test"].shape == (4,)


def test_cifar_python_batches_refuse_foreign_pickles(tmp_path) -> None:
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    arrays = load_cifar10_arrays(tmp_path)
    assert arrays["y_train"].tolist() == [1, 2] * 5

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(pickle.UnpicklingError, match="refusing global"):
        load_cifar10_arrays(tmp_path)


def test_npz_data_file(tmp_path) -> None:
    x = np.random.default_rng(0).random((5, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", x=x, y=np.array([0, 1, 2, 1, 0]))
    data = load_dataset(str(tmp_path / "mine.npz"))
    assert np.array_equal(data.x, x) and data.labels == ["0", "1", "2"]


@pytest.mark.needs_data("text/sst2")
def test_sst2_calibration_sentences_share_no_phrase_with_training() -> None:
    """SST-2's phrases are pieces of parsed sentences: held-out sentences must not leak into training."""
    from exitserve.models.data import load_dataset

    train, val, test = load_dataset("sst2:train"), load_dataset("sst2:val"), load_dataset("sst2:test")
    assert len(test) == 872 and set(val.labels) == {"negative", "positive"}
    assert 1500 < len(val) < 2100 and len(train) > 40_000
    assert load_dataset("sst2:val").fingerprint == val.fingerprint  # seeded, repeatable
    assert load_dataset("sst2:val", seed=1).fingerprint != val.fingerprint
    train_phrases = {tuple(str(t).split()) for t in train.x}
    for sentence in val.x[:300]:
        tokens = tuple(str(sentence).split())
        spans = {tokens[a:b] for a in range(len(tokens)) for b in range(a + 1, len(tokens) + 1)}
        assert not spans & train_phrases, f"a piece of {sentence!r} is in the training phrases"
    # Held-out items are whole sentences, about as long as the test sentences (not short phrases).
    mean_words = np.mean([len(str(t).split()) for t in val.x])
    assert abs(mean_words - np.mean([len(str(t).split()) for t in test.x])) < 3


@pytest.mark.needs_data("text/agnews")
def test_agnews_splits() -> None:
    from exitserve.models.data import load_dataset

    train, val, test = load_dataset("agnews:train"), load_dataset("agnews:val"), load_dataset("agnews:test")
    assert (len(train), len(val), len(test)) == (7501, 2500, 7600)
    # rows, not texts, are split: AG News itself repeats a handful of articles (3 here)
    assert len(set(map(str, train.x)) & set(map(str, val.x))) <= 5
    assert np.bincount(test.y).tolist() == [1900] * 4
