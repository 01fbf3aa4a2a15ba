"""The shifted and foreign test sets (issue 26): same seed, same bytes; CIFAR-shaped float32 on the
8-bit grid; corruptions grow with severity; MNIST digits become 32x32 RGB; saved sets load back."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from exitserve.models import shifted
from exitserve.models.shifted import (
    CORRUPTIONS,
    NO_LABEL,
    SEVERITIES,
    build_sets,
    corrupt,
    load_sets,
    save_sets,
)

SYNTHETIC = ["uniform-noise", "gaussian-images", "constant", "gradient"]  # need no data files
# The project's data marker (tests/conftest.py): a one-line skip without the data, a failure in CI with it.
needs_cifar = pytest.mark.needs_data("cifar10")
needs_mnist = pytest.mark.needs_data("mnist")


def images(n: int = 24, seed: int = 3) -> np.ndarray:
    """Smooth images with texture, on the 8-bit grid: 6x6 random colours upsampled bicubic, plus fine noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.random((n, 3, 6, 6)).astype(np.float32)
    smooth = np.stack([[np.asarray(Image.fromarray(c).resize((32, 32), Image.Resampling.BICUBIC)) for c in im] for im in coarse])
    return (np.rint(np.clip(0.15 + 0.7 * smooth + rng.normal(0, 0.02, smooth.shape), 0, 1) * 255) / 255).astype(np.float32)


def check_set(x: np.ndarray, n: int) -> None:
    assert x.shape == (n, 3, 32, 32) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert np.abs(x * 255 - np.rint(x * 255)).max() < 1e-3  # on the 8-bit grid


def test_foreign_sets_are_seeded_bytes() -> None:
    a = {s.name: s for s in build_sets(16, seed=5, families=[], foreign=SYNTHETIC)}
    b = {s.name: s for s in build_sets(16, seed=5, families=[], foreign=SYNTHETIC)}
    c = {s.name: s for s in build_sets(16, seed=6, families=[], foreign=SYNTHETIC)}
    assert list(a) == SYNTHETIC
    for name in SYNTHETIC:
        assert a[name].x.tobytes() == b[name].x.tobytes()
        assert a[name].x.tobytes() != c[name].x.tobytes()
        check_set(a[name].x, 16)
        assert (a[name].y == NO_LABEL).all() and not a[name].labelled and a[name].severity == 0
    # A set's bytes do not depend on which other sets were built with it.
    alone = next(build_sets(16, seed=5, families=[], foreign=["gradient"]))
    assert alone.x.tobytes() == a["gradient"].x.tobytes()


def test_foreign_sets_are_what_they_say() -> None:
    sets = {s.name: s.x for s in build_sets(32, seed=0, families=[], foreign=SYNTHETIC)}
    constant = sets["constant"]
    assert (constant == constant[:, :, :1, :1]).all()  # one colour per image
    assert len({tuple(c) for c in constant[:, :, 0, 0].round(3)}) > 20
    gradient = sets["gradient"]
    assert (gradient.std(axis=(2, 3)) > 0).any(axis=1).mean() > 0.9 and np.diff(gradient, axis=3).std() < 0.02
    uniform = sets["uniform-noise"]
    assert abs(uniform.mean() - 0.5) < 0.01 and abs(uniform.std() - np.sqrt(1 / 12)) < 0.01


@pytest.mark.parametrize("family", list(CORRUPTIONS))
def test_corruptions_are_seeded_grid_images_that_keep_shape(family: str) -> None:
    x = images()
    for severity in (1, 5):
        a, b = corrupt(x, family, severity, seed=1), corrupt(x, family, severity, seed=1)
        assert a.tobytes() == b.tobytes()
        check_set(a, len(x))
        assert not np.array_equal(a, x)
    if family == "gaussian-noise":
        assert corrupt(x, family, 3, seed=1).tobytes() != corrupt(x, family, 3, seed=2).tobytes()


def _distances(x: np.ndarray, family: str) -> list[float]:
    return [float(np.sqrt(((corrupt(x, family, s) - x) ** 2).mean())) for s in SEVERITIES]


@pytest.mark.parametrize("family", list(CORRUPTIONS))
def test_severity_moves_images_further_from_the_clean_ones(family: str) -> None:
    distances = _distances(images(64), family)
    assert distances[-1] > 1.2 * distances[0] > 0, distances
    assert all(b > a for a, b in zip(distances, distances[1:], strict=False)), distances


@needs_cifar
def test_severity_is_monotonic_on_cifar_test_images() -> None:
    x, y = shifted.cifar_subset(200, seed=0)
    assert x.shape == (200, 3, 32, 32) and len(np.unique(y)) == 10  # a mixed subset, not one class
    for family in CORRUPTIONS:
        distances = _distances(x, family)
        assert all(b > a for a, b in zip(distances, distances[1:], strict=False)), (family, distances)


def test_brightness_adds_to_the_hsv_value() -> None:
    """make_cifar_c converts to HSV, adds c to V and converts back; the shortcut must agree."""
    x = images(4)
    x[0, :, :4, :4] = 0.0  # black pixels turn grey
    out = corrupt(x, "brightness", 3)
    c = shifted.BRIGHTNESS[2]
    for i, r, q in ((0, 0, 0), (1, 5, 7), (2, 31, 2), (3, 16, 16)):
        h, s, v = colorsys.rgb_to_hsv(*x[i, :, r, q])
        expected = colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))
        assert np.allclose(out[i, :, r, q], expected, atol=0.5 / 255 + 1e-6)


def test_contrast_keeps_each_channel_mean_and_defocus_kernel_is_a_blur() -> None:
    x = images(8)
    out = corrupt(x, "contrast", 2)
    assert np.allclose(out.mean(axis=(2, 3)), x.mean(axis=(2, 3)), atol=2 / 255)
    assert out.std(axis=(2, 3)).mean() < 0.6 * x.std(axis=(2, 3)).mean()
    for params in shifted.DEFOCUS:
        kernel = shifted._disk(*params)
        assert np.isclose(kernel.sum(), 1.0) and np.allclose(kernel, kernel.T) and np.allclose(kernel, kernel[::-1])


def test_unknown_names_and_severities_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images(2), "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(images(2), "jpeg", 6)
    with pytest.raises(ValueError, match="unknown foreign"):
        list(build_sets(2, families=[], foreign=["svhn"]))


@needs_mnist
def test_mnist_digits_become_32x32_rgb() -> None:
    from exitserve.models.data import load_mnist_arrays

    [s] = build_sets(40, seed=2, families=[], foreign=["mnist"])
    check_set(s.x, 40)
    assert (s.x[:, 0] == s.x[:, 1]).all() and (s.x[:, 1] == s.x[:, 2]).all()  # grey as RGB
    assert (s.y == NO_LABEL).all()
    digits = load_mnist_arrays()["x_test"]
    # Digits on black: mostly dark like MNIST, the same ink share as the 28x28 originals (±3 points).
    ink = (s.x[:, 0] > 0.5).mean()
    assert abs(ink - (digits > 127).mean()) < 0.03 and s.x[:, 0, 0, 0].max() == 0.0
    assert next(build_sets(40, seed=2, families=[], foreign=["mnist"])).x.tobytes() == s.x.tobytes()


def test_saved_sets_load_back_the_same_bytes(tmp_path) -> None:
    built = list(build_sets(8, seed=4, families=[], foreign=["uniform-noise", "constant"]))
    rows = save_sets(built, tmp_path, seed=4)
    assert [r["name"] for r in rows] == ["uniform-noise", "constant"] and rows[0]["kind"] == "foreign"
    assert shifted.sets_seed(tmp_path) == 4
    loaded = list(load_sets(tmp_path))
    for a, b in zip(built, loaded, strict=True):
        assert (a.name, a.family, a.severity) == (b.name, b.family, b.severity)
        assert a.x.tobytes() == b.x.tobytes() and a.y.tobytes() == b.y.tobytes()
    assert [s.name for s in load_sets(tmp_path, ["constant"])] == ["constant"]
    with pytest.raises(ValueError, match="no set named fog"):
        load_sets(tmp_path, ["fog"])
    with pytest.raises(ValueError, match="shifted-sets"):
        load_sets(tmp_path / "nowhere")
