"""Shifted and foreign test sets for CIFAR-10 models, made offline and reproducibly (issue 26).

Every set is float32 NCHW (N, 3, 32, 32) in [0, 1], on the 1/255 grid of the 8-bit images it
stands for (so a set saved as uint8 and loaded again is the same bytes), with int64 labels:

- corruptions of the CIFAR-10 test set at severities 1..5, labels kept. The families and their
  parameters are CIFAR-10-C's (Hendrycks & Dietterich 2019, `make_cifar_c.py`) where numpy and
  Pillow can make them: gaussian-noise, defocus-blur, jpeg, contrast, brightness, pixelate;
- foreign inputs with no CIFAR-10 label (`y = -1`: any answer on them is wrong, so the share
  promised is the error): uniform-noise, gaussian-noise images, constant colours, colour gradients,
  and MNIST test digits resized to 32x32 RGB;
- the clean CIFAR-10 test subset the corruptions start from, as the reference row.

Everything comes from one seed: the same seed and size give the same bytes on any machine.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exitserve.models.data import load_dataset, load_mnist_arrays

NO_LABEL = -1  # foreign inputs: no CIFAR-10 class is right
SEVERITIES = (1, 2, 3, 4, 5)
INDEX_FILE = "sets.json"
SIZE, CHANNELS = 32, 3

# CIFAR-10-C's parameters per severity (make_cifar_c.py, the 32x32 variants).
GAUSSIAN_NOISE_STD = (0.04, 0.06, 0.08, 0.09, 0.10)
DEFOCUS = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))  # (disk radius, alias blur σ)
JPEG_QUALITY = (80, 65, 58, 50, 40)
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)


@dataclass(frozen=True)
class ShiftedSet:
    name: str  # file stem: "jpeg-3", "mnist", "clean"
    family: str
    severity: int  # 1..5 for corruptions, 0 for clean and foreign sets
    x: np.ndarray
    y: np.ndarray

    @property
    def labelled(self) -> bool:
        return bool(self.y.size) and bool((self.y != NO_LABEL).all())

    def meta(self) -> dict:
        return {"name": self.name, "family": self.family, "severity": self.severity, "n": int(self.y.size),
                "labelled": self.labelled, "kind": "clean" if self.family == "clean" else
                ("corruption" if self.severity else "foreign")}


def _rng(seed: int, name: str) -> np.random.Generator:
    """One stream per set, so a set's bytes do not depend on which other sets are built."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _grid(x: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] and round to the 8-bit grid, as float32."""
    return (np.rint(np.clip(x, 0.0, 1.0) * 255.0) / np.float32(255.0)).astype(np.float32)


def _to_uint8_hwc(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def _from_uint8_hwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


# --- corruptions (x: float32 NCHW in [0, 1]) ----------------------------------------------------


def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return _grid(x + rng.normal(0.0, GAUSSIAN_NOISE_STD[severity - 1], x.shape))


def _gaussian_taps(sigma: float) -> np.ndarray:
    """OpenCV's 3-tap Gaussian kernel for sigma (cv2.GaussianBlur with ksize 3)."""
    taps = np.exp(-np.arange(-1, 2) ** 2 / (2 * sigma**2))
    return taps / taps.sum()


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c's defocus kernel: an aliased disk smoothed by a 3x3 Gaussian, reflect-101 borders
    (cv2.GaussianBlur's default), trimmed to its non-zero support."""
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = _gaussian_taps(alias_blur)
    padded = np.pad(disk, 1, mode="reflect")
    rows = sum(taps[i] * padded[i:i + disk.shape[0], :] for i in range(3))
    kernel = sum(taps[j] * rows[:, j:j + disk.shape[1]] for j in range(3))
    keep = np.flatnonzero(np.abs(kernel).sum(axis=0) > 0)
    half = int(max(abs(keep - 8)))
    return np.asarray(kernel[8 - half:9 + half, 8 - half:9 + half])


def defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """cv2.filter2D with the disk kernel (a correlation, reflect-101 borders), per channel."""
    kernel = _disk(*DEFOCUS[severity - 1])
    half = kernel.shape[0] // 2
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (half, half), (half, half)), mode="reflect")
    out = np.zeros(x.shape, np.float64)
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            out += kernel[i, j] * padded[:, :, i:i + SIZE, j:j + SIZE]
    return _grid(out)


def _per_image(x: np.ndarray, change: Callable[[object], object]) -> np.ndarray:
    from PIL import Image

    images = _to_uint8_hwc(x)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        out[i] = np.asarray(change(Image.fromarray(image)), dtype=np.uint8)
    return _from_uint8_hwc(out)


def jpeg(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    def compress(image: object) -> object:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=JPEG_QUALITY[severity - 1])  # type: ignore[attr-defined]
        return Image.open(buffer).convert("RGB")

    return _per_image(x, compress)


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    means = x.mean(axis=(2, 3), keepdims=True)  # per image and channel, as make_cifar_c
    return _grid((x - means) * CONTRAST[severity - 1] + means)


def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """HSV value + c, clipped (make_cifar_c via skimage): at fixed hue and saturation RGB scales with V,
    and black (V = 0, saturation 0) becomes grey c."""
    value = x.max(axis=1, keepdims=True)
    brighter = np.minimum(value + BRIGHTNESS[severity - 1], 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(value > 0, x * (brighter / value), brighter)
    return _grid(out)


def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    side = int(SIZE * PIXELATE[severity - 1])
    return _per_image(x, lambda im: im.resize((side, side), Image.Resampling.BOX).resize((SIZE, SIZE), Image.Resampling.BOX))  # type: ignore[attr-defined]


CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian-noise": gaussian_noise,
    "defocus-blur": defocus_blur,
    "jpeg": jpeg,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
}


def corrupt(x: np.ndarray, family: str, severity: int, seed: int = 0) -> np.ndarray:
    if family not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {family!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity} outside 1..5")
    return CORRUPTIONS[family](np.asarray(x, np.float32), severity, _rng(seed, f"{family}-{severity}"))


# --- foreign inputs ----------------------------------------------------------------------------


def uniform_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    return _grid(rng.random((n, CHANNELS, SIZE, SIZE)))


def gaussian_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """Per-pixel N(0.5, 0.25²), clipped: noise with CIFAR-10's mean grey and spread."""
    return _grid(rng.normal(0.5, 0.25, (n, CHANNELS, SIZE, SIZE)))


def constant_images(n: int, rng: np.random.Generator) -> np.ndarray:
    return _grid(np.broadcast_to(rng.random((n, CHANNELS, 1, 1)), (n, CHANNELS, SIZE, SIZE)))


def gradient_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """A linear ramp between two random colours along a random direction."""
    start, end = rng.random((n, CHANNELS, 1, 1)), rng.random((n, CHANNELS, 1, 1))
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1, 1))
    coords = np.linspace(0.0, 1.0, SIZE)
    along = np.cos(angle) * coords[None, None, None, :] + np.sin(angle) * coords[None, None, :, None]
    lo, hi = along.min(axis=(2, 3), keepdims=True), along.max(axis=(2, 3), keepdims=True)
    t = (along - lo) / (hi - lo)
    return _grid(start + (end - start) * t)


def mnist_as_cifar(n: int, rng: np.random.Generator, root: Path | None = None) -> np.ndarray:
    """MNIST test digits (a seeded choice), resized 28 -> 32 bilinear and repeated to 3 channels."""
    from PIL import Image

    digits = load_mnist_arrays(root)["x_test"]
    chosen = digits[np.sort(rng.permutation(len(digits))[:n])]
    resized = np.stack([np.asarray(Image.fromarray(d).resize((SIZE, SIZE), Image.Resampling.BILINEAR)) for d in chosen])
    return np.ascontiguousarray(np.repeat(resized[:, None], CHANNELS, axis=1), dtype=np.float32) / np.float32(255.0)


FOREIGN: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "uniform-noise": uniform_noise,
    "gaussian-images": gaussian_images,
    "constant": constant_images,
    "gradient": gradient_images,
    "mnist": mnist_as_cifar,
}


# --- whole collections -------------------------------------------------------------------------


def cifar_subset(size: int, seed: int = 0, root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`size` CIFAR-10 test images in a seeded order (the files come sorted by class)."""
    test = load_dataset("cifar10:test", root=root)
    order = np.sort(_rng(seed, "cifar10-test").permutation(len(test))[:size])
    return test.x[order], test.y[order]


def build_sets(
    size: int = 2000,
    seed: int = 0,
    *,
    families: Iterable[str] = CORRUPTIONS,
    severities: Iterable[int] = SEVERITIES,
    foreign: Iterable[str] = FOREIGN,
    cifar_root: Path | None = None,
    mnist_root: Path | None = None,
) -> Iterator[ShiftedSet]:
    """The clean subset, each corruption at each severity, then each foreign set; lazily, one at a time."""
    families, severities, foreign = list(families), list(severities), list(foreign)
    for name in foreign:
        if name not in FOREIGN:
            raise ValueError(f"unknown foreign set {name!r}; choose from {', '.join(FOREIGN)}")
    if families:
        x, y = cifar_subset(size, seed, cifar_root)
        yield ShiftedSet("clean", "clean", 0, x, y)
        for family in families:
            for severity in severities:
                yield ShiftedSet(f"{family}-{severity}", family, severity, corrupt(x, family, severity, seed), y)
    for name in foreign:
        rng = _rng(seed, name)
        x = mnist_as_cifar(size, rng, mnist_root) if name == "mnist" else FOREIGN[name](size, rng)
        yield ShiftedSet(name, name, 0, x, np.full(len(x), NO_LABEL, np.int64))


def save_sets(sets: Iterable[ShiftedSet], out: str | Path, *, seed: int | None = None) -> list[dict]:
    """One `<name>.npz` per set (x uint8 NCHW, y int64; lossless: the sets are on the 8-bit grid) and
    sets.json listing them in order. Returns the index rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in sets:
        np.savez(out / f"{s.name}.npz", x=np.rint(s.x * 255.0).astype(np.uint8), y=s.y)
        rows.append({**s.meta(), "file": f"{s.name}.npz"})
    (out / INDEX_FILE).write_text(json.dumps({"seed": seed, "sets": rows}, indent=1) + "\n")
    return rows


def _index(directory: Path) -> dict:
    index = directory / INDEX_FILE
    if not index.is_file():
        raise ValueError(f"{directory}: no {INDEX_FILE} here (build the sets with `exitserve shifted-sets --out DIR`)")
    return dict(json.loads(index.read_text()))


def sets_seed(directory: str | Path) -> int | None:
    seed = _index(Path(directory)).get("seed")
    return None if seed is None else int(seed)


def load_sets(directory: str | Path, names: Sequence[str] | None = None) -> Iterator[ShiftedSet]:
    """The sets `save_sets` wrote (all, or those named), in the index's order, as float32 in [0, 1].

    The index and the names are checked at the call; the sets load one at a time as iterated."""
    directory = Path(directory)
    rows = _index(directory)["sets"]
    if names is not None:
        unknown = set(names) - {r["name"] for r in rows}
        if unknown:
            raise ValueError(f"{directory}: no set named {', '.join(sorted(unknown))}; "
                             f"it has {', '.join(r['name'] for r in rows)}")
        rows = [r for r in rows if r["name"] in names]
    return _load_rows(directory, rows)


def _load_rows(directory: Path, rows: list[dict]) -> Iterator[ShiftedSet]:
    for row in rows:
        with np.load(directory / row["file"]) as data:
            x, y = data["x"].astype(np.float32) / np.float32(255.0), data["y"].astype(np.int64)
        yield ShiftedSet(row["name"], row["family"], int(row["severity"]), x, y)
