"""Data sets for training, calibration and evaluation (numpy only: calibration runs without torch).

Images come back as float32 NCHW scaled to [0, 1] (models normalise inside their graph) and labels
as int64. Validation is carved out of the training set with a seeded permutation before training,
so calibration data is never trained on.

Spec strings: `cifar10:val`, `mnist:test`, `digits:train`, or a path to an `.npz` with `x` and `y`.
Text sets (`sst2:…`, `agnews:…`) come back with `x` an object array of strings; the bundle's own
tokenizer turns them into token ids.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SST2_CLASSES = ["negative", "positive"]
AGNEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
TEXT_DATASETS = ("sst2", "agnews")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DIGIT_CLASSES = [str(d) for d in range(10)]
SPLITS = ("train", "val", "test")
VALIDATION_SIZE = {"cifar10": 5000, "mnist": 5000}


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray
    y: np.ndarray
    labels: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.y)

    @property
    def fingerprint(self) -> str:
        if self.x.dtype == object:  # strings: hash the text, not the object pointers
            digest = hashlib.sha256("\n".join(map(str, self.x)).encode())
        else:
            digest = hashlib.sha256(np.ascontiguousarray(self.x).tobytes())
        digest.update(np.ascontiguousarray(self.y).tobytes())
        return f"{self.name}:{len(self)}:{digest.hexdigest()[:16]}"


def data_root() -> Path:
    """EXITSERVE_DATA, else ../shared/data from the working directory or from this checkout."""
    if env := os.environ.get("EXITSERVE_DATA"):
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd() / "data"


def cache_dir() -> Path:
    path = Path(os.environ.get("EXITSERVE_CACHE", Path.home() / ".cache" / "exitserve"))
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- CIFAR-10 ---------------------------------------------------------------------------------


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:  # not a regular file (filtered out above)
        raise ValueError(f"{member.name}: not a file in the archive")
    return handle.read()


def _decode_jpeg_tree(names_and_bytes: list[tuple[str, bytes]]) -> dict[str, np.ndarray]:
    from PIL import Image

    out: dict[str, tuple[list[np.ndarray], list[int]]] = {"train": ([], []), "test": ([], [])}
    for name, blob in sorted(names_and_bytes):
        parts = Path(name).parts
        split, cls = parts[-3], parts[-2]
        if split not in out or cls not in CIFAR10_CLASSES:
            continue
        image = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), dtype=np.uint8)
        out[split][0].append(image)
        out[split][1].append(CIFAR10_CLASSES.index(cls))
    arrays = {}
    for split, (images, labels) in out.items():
        arrays[f"x_{split}"] = np.stack(images)
        arrays[f"y_{split}"] = np.asarray(labels, dtype=np.int64)
    return arrays


def _cifar_from_jpeg_tar(path: Path) -> dict[str, np.ndarray]:
    key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"cifar10-{key}.npz"
    if cached.is_file():
        with np.load(cached) as data:
            return {k: data[k] for k in data.files}
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png"))]
        blobs = [(m.name, _member_bytes(tar, m)) for m in members]
    arrays = _decode_jpeg_tree(blobs)
    tmp = cached.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)  # type: ignore[arg-type]  # numpy's stub reads **arrays as its own options
    tmp.replace(cached)
    return arrays


def _cifar_from_jpeg_dir(path: Path) -> dict[str, np.ndarray]:
    files = [p for p in path.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    return _decode_jpeg_tree([(str(p.relative_to(path)), p.read_bytes()) for p in files])


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10 python batches are pickles: allow only the numpy reconstruction globals."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle API
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name} in a data batch")
        return super().find_class(module, name)


def _cifar_from_python_batches(path: Path) -> dict[str, np.ndarray]:
    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        with (path / name).open("rb") as handle:
            batch = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
        x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return x, np.asarray(batch[b"labels"], dtype=np.int64)

    train = [read(f"data_batch_{i}") for i in range(1, 6)]
    test = read("test_batch")
    return {
        "x_train": np.concatenate([t[0] for t in train]),
        "y_train": np.concatenate([t[1] for t in train]),
        "x_test": test[0],
        "y_test": test[1],
    }


def _cifar_from_binary_batches(path: Path) -> dict[str, np.ndarray]:
    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        raw = np.fromfile(path / name, dtype=np.uint8).reshape(-1, 3073)
        return raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), raw[:, 0].astype(np.int64)

    train = [read(f"data_batch_{i}.bin") for i in range(1, 6)]
    test = read("test_batch.bin")
    return {
        "x_train": np.concatenate([t[0] for t in train]),
        "y_train": np.concatenate([t[1] for t in train]),
        "x_test": test[0],
        "y_test": test[1],
    }


def load_cifar10_arrays(root: Path | None = None) -> dict[str, np.ndarray]:
    """uint8 NHWC arrays from any supported layout under `root` (default: the shared data folder)."""
    root = Path(root) if root else data_root() / "cifar10"
    if root.is_file():
        return _cifar_from_jpeg_tar(root)
    candidates = [
        (root / "cifar10-jpg.tar.gz", _cifar_from_jpeg_tar),
        (root / "cifar-10-batches-py" / "data_batch_1", lambda p: _cifar_from_python_batches(p.parent)),
        (root / "data_batch_1", lambda p: _cifar_from_python_batches(p.parent)),
        (root / "cifar-10-batches-bin" / "data_batch_1.bin", lambda p: _cifar_from_binary_batches(p.parent)),
        (root / "data_batch_1.bin", lambda p: _cifar_from_binary_batches(p.parent)),
        (root / "train", lambda p: _cifar_from_jpeg_dir(p.parent)),
    ]
    for marker, reader in candidates:
        if marker.exists():
            return reader(marker)
    raise FileNotFoundError(f"no CIFAR-10 data found under {root}")


# --- MNIST ------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte idx files are supported")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist_arrays(root: Path | None = None) -> dict[str, np.ndarray]:
    root = Path(root) if root else data_root() / "mnist"
    if (root / "mnist_train.npz").is_file():
        out = {}
        for split in ("train", "test"):
            with np.load(root / f"mnist_{split}.npz") as data:
                out[f"x_{split}"], out[f"y_{split}"] = data["x"], data["y"].astype(np.int64)
        return out
    names = {"train": "train", "test": "t10k"}
    out = {}
    for split, prefix in names.items():
        for suffix in ("", ".gz"):
            images = root / f"{prefix}-images-idx3-ubyte{suffix}"
            labels = root / f"{prefix}-labels-idx1-ubyte{suffix}"
            if images.is_file() and labels.is_file():
                out[f"x_{split}"] = _read_idx(images)
                out[f"y_{split}"] = _read_idx(labels).astype(np.int64)
                break
        else:
            raise FileNotFoundError(f"no MNIST data found under {root}")
    return out


# --- sklearn digits ---------------------------------------------------------------------------


def load_digits_arrays() -> dict[str, np.ndarray]:
    """sklearn's 8x8 digits (1,797 images), split 80/20 into train and test with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(1234).permutation(len(y))
    cut = int(0.8 * len(y))
    return {"x_train": x[order[:cut]], "y_train": y[order[:cut]], "x_test": x[order[cut:]], "y_test": y[order[cut:]]}


# --- text ------------------------------------------------------------------------------------


def _read_tsv(path: Path, header: bool) -> list[tuple[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: text data not found (set EXITSERVE_DATA to the folder holding text/)")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if header and number == 0:
                continue
            text, sep, label = line.rstrip("\n").rpartition("\t")
            if not sep:
                raise ValueError(f"{path}:{number + 1}: expected text<TAB>label")
            rows.append((text.strip(), label.strip()))
    return rows


AGNEWS_VALIDATION_SIZE = 2500  # of the 10,001 labelled non-test rows; the rest trains
SST2_VALIDATION_SHARE = 0.25  # of the training sentences, held out whole for calibration


def _spans(tokens: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    for a in range(len(tokens)):
        for b in range(a + 1, len(tokens) + 1):
            yield tokens[a:b]


def _sst2_sentence_split(rows: list[tuple[str, str]], seed: int) -> tuple[list[int], list[int]]:
    """(training phrase rows, held-out sentence rows) of SST-2's training phrases.

    SST-2's training set holds every phrase of ~6,900 parsed sentences, and the `dev.tsv` shipped
    here is a random 10 % of those phrases: nearly every one is a piece of a sentence whose other
    pieces are in `train.tsv`, so accuracy on it is inflated (0.90 where the real test gives
    0.80) and tables calibrated on it over-promise. Instead each phrase is traced to the longest
    phrase containing it (its sentence), whole sentences are held out (seeded), and calibration
    uses those sentences: full sentences, like the test set, that no training phrase is part of.
    """
    tokens = [tuple(text.split()) for text, _ in rows]
    order = sorted(range(len(rows)), key=lambda i: -len(tokens[i]))
    span_owner: dict[tuple[str, ...], int] = {}
    sentence_of = [0] * len(rows)
    sentences: list[int] = []
    for i in order:
        owner = span_owner.get(tokens[i])
        if owner is None:  # not inside any longer phrase: a sentence
            owner = len(sentences)
            sentences.append(i)
            for span in _spans(tokens[i]):
                span_owner.setdefault(span, owner)
        sentence_of[i] = owner
    held_out = np.random.default_rng(seed).random(len(sentences)) < SST2_VALIDATION_SHARE
    held_out_spans = {span for s in np.flatnonzero(held_out) for span in _spans(tokens[sentences[s]])}
    train = [i for i in range(len(rows)) if not held_out[sentence_of[i]] and tokens[i] not in held_out_spans]
    return train, sorted(sentences[s] for s in np.flatnonzero(held_out))


def load_text_dataset(name: str, split: str, seed: int = 0, root: Path | None = None) -> Dataset:
    """SST-2 (sentence-level split of the training phrases into train / val; GLUE dev as test) or
    AG News (its labelled dev file split into train / val, seeded; test).

    Layout under the data root: text/sst2/{train,dev,test}.tsv with a `sentence<TAB>label` header,
    text/agnews/{dev,test}.tsv without header, `text<TAB>label-name`.
    """
    base = (root or data_root()) / "text" / name
    if name == "sst2":
        labels = SST2_CLASSES
        if split == "test":
            rows = _read_tsv(base / "test.tsv", header=True)
        else:  # train.tsv + dev.tsv together are GLUE's training phrases
            rows = _read_tsv(base / "train.tsv", header=True) + _read_tsv(base / "dev.tsv", header=True)
            train_idx, val_idx = _sst2_sentence_split(rows, seed)
            rows = [rows[i] for i in (train_idx if split == "train" else val_idx)]
        y = np.array([int(label) for _, label in rows], np.int64)
    else:
        labels = AGNEWS_CLASSES
        rows = _read_tsv(base / ("test.tsv" if split == "test" else "dev.tsv"), header=False)
        y = np.array([labels.index(label) for _, label in rows], np.int64)
        if split != "test":
            train_part, val_part = split_train_val(len(rows), AGNEWS_VALIDATION_SIZE, seed)
            part = train_part if split == "train" else val_part
            rows, y = [rows[i] for i in part], y[part]
    x = np.empty(len(rows), dtype=object)
    x[:] = [text for text, _ in rows]
    suffix = f"-seed{seed}" if split != "test" else ""
    return Dataset(x, y, list(labels), f"{name}-{split}{suffix}")


# --- splits -----------------------------------------------------------------------------------


def split_train_val(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and the held-out validation part of a training set."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[val_size:]), np.sort(order[:val_size])


def _to_float_nchw(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, :, :, None]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


def load_dataset(spec: str, seed: int = 0, root: str | Path | None = None) -> Dataset:
    """Load `name:split` (or an `.npz` path) as float32 NCHW in [0, 1] with int64 labels."""
    if spec.endswith(".npz") or Path(spec).suffix == ".npz":
        with np.load(spec) as data:
            if "x" not in data.files or "y" not in data.files:
                raise ValueError(f"{spec}: an .npz data file needs arrays 'x' and 'y'")
            x, y = data["x"], data["y"].astype(np.int64)
        if x.dtype == np.uint8:
            x = _to_float_nchw(x) if x.shape[-1] in (1, 3) or x.ndim == 3 else x.astype(np.float32) / 255.0
        num_classes = int(y.max()) + 1 if len(y) else 0
        return Dataset(np.asarray(x, dtype=np.float32), y, [str(i) for i in range(num_classes)], Path(spec).stem)

    name, _, split = spec.partition(":")
    split = split or "test"
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} in {spec!r}; choose from {SPLITS}")
    if name in TEXT_DATASETS:
        return load_text_dataset(name, split, seed, Path(root) if root else None)
    if name == "cifar10":
        arrays, labels = load_cifar10_arrays(Path(root) if root else None), CIFAR10_CLASSES
    elif name == "mnist":
        arrays, labels = load_mnist_arrays(Path(root) if root else None), DIGIT_CLASSES
    elif name == "digits":
        arrays, labels = load_digits_arrays(), DIGIT_CLASSES
    else:
        raise ValueError(f"unknown data set {name!r}; use cifar10, mnist, digits or a .npz path")

    if split == "test":
        x, y = arrays["x_test"], arrays["y_test"]
    else:
        n = len(arrays["y_train"])
        val_size = VALIDATION_SIZE.get(name, n // 5)
        train_idx, val_idx = split_train_val(n, val_size, seed)
        idx = train_idx if split == "train" else val_idx
        x, y = arrays["x_train"][idx], arrays["y_train"][idx]
    return Dataset(_to_float_nchw(x), y, list(labels), f"{name}-{split}-seed{seed}")
