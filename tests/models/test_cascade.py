"""The cascade family (issue 27): sub-networks that reuse each other's features, the whitening stem,
export of a four-tensor state, and the fast recipe's training parts."""

from __future__ import annotations

from dataclasses import replace
from itertools import accumulate

import numpy as np
import pytest
import torch

from exitserve.models.architectures import build_architecture
from exitserve.models.bundle import load_bundle
from exitserve.models.cascade import CASCADE_PRESETS, STATE_NAMES, Stem, cascade_net, fit_to_data
from exitserve.models.data import Dataset
from exitserve.models.export import PARITY_TOLERANCE, export_bundle
from exitserve.models.flops import segment_flops
from exitserve.models.recipes import apply_recipe
from exitserve.models.training import Lookahead, TrainConfig, train
from exitserve.service.runners.onnx_runtime import OnnxRunner
from tests.conftest import CIFAR10_FIXTURE

TINY = ((4, 8, 8), (8, 8, 16))


@pytest.fixture(scope="module")
def cifar_images() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(CIFAR10_FIXTURE)
    return np.ascontiguousarray(data["x"].transpose(0, 3, 1, 2), dtype=np.float32) / 255.0, data["y"].astype(np.int64)


def test_every_exit_ends_a_whole_sub_network_and_sees_all_earlier_ones() -> None:
    net = cascade_net(TINY).eval()
    assert net.num_exits == 2 and net.state_names == STATE_NAMES
    state = net.segments[0](torch.rand(3, 3, 32, 32))
    assert [tuple(t.shape[1:]) for t in state] == [(24, 31, 31), (4, 15, 15), (8, 7, 7), (8, 3, 3)]
    state = net.segments[1](*state)
    # the second sub-network extends every scale's features: its exit reads 8 + 16 final channels
    assert [tuple(t.shape[1:]) for t in state] == [(24, 31, 31), (12, 15, 15), (16, 7, 7), (24, 3, 3)]
    assert net.heads[1].classifier.in_features == 24
    assert [z.shape for z in net(torch.rand(2, 3, 32, 32))] == [(2, 10), (2, 10)]


def test_one_stage_presets_are_the_static_networks_inside_the_large_cascade() -> None:
    large = CASCADE_PRESETS["cascade-large"]
    assert all(len(CASCADE_PRESETS[f"cascade-{n}"]) == 1 for n in ("w16", "w32", "w48", "w64", "w64-256"))
    assert large[0] == CASCADE_PRESETS["cascade-w16"][0] and large[-1] == CASCADE_PRESETS["cascade-w64-256"][0]
    cost = [f / 1e6 for f in accumulate(segment_flops(build_architecture("cascade-large", 10), (torch.rand(1, 3, 32, 32),)))]
    w16 = segment_flops(build_architecture("cascade-w16", 10), (torch.rand(1, 3, 32, 32),))[0] / 1e6
    assert cost[0] == pytest.approx(w16)  # the first exit costs exactly the smallest static network
    assert cost == sorted(cost) and cost[-1] > 20 * cost[0]


def test_the_stem_whitens_the_training_patches(cifar_images) -> None:
    images = torch.from_numpy(cifar_images[0])
    stem = Stem((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    assert fit_to_data(torch.nn.Sequential(stem), images)
    assert not fit_to_data(build_architecture("resnet-small", 10), images)  # nothing to fit there
    normalised = stem.normalize(images)
    out = torch.nn.functional.conv2d(normalised, stem.weight)[:, :12]  # the 12 eigen-directions (the rest negate them)
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    covariance = flat @ flat.T / flat.shape[1]
    variance = torch.diag(covariance)
    # unit second moment along the strong directions; the weakest are damped by eps (λ / (λ + eps)) ...
    assert torch.all(variance[:6] > 0.98) and torch.all(variance < 1.0 + 1e-4) and variance[-1] > 0.05
    off = covariance - torch.diag(variance)
    assert off.abs().max() < 1e-4  # ... and every pair decorrelated
    assert not stem.weight.requires_grad and "weight" not in dict(stem.named_parameters())  # frozen: a buffer


def test_a_cascade_exports_with_its_four_tensor_state_and_runs_in_onnx_runtime(tmp_path, cifar_images) -> None:
    torch.manual_seed(0)
    net = cascade_net(TINY)
    x = torch.from_numpy(cifar_images[0][:16])
    fit_to_data(net, x)
    net.train()
    net(x)  # batch-norm statistics off their defaults, so parity checks real numbers
    net.eval()
    manifest, worst = export_bundle(net, x, tmp_path / "b", labels=[str(i) for i in range(10)])
    assert manifest.segments[0].outputs == [f"{s}_0" for s in STATE_NAMES] + ["logits_0"]
    assert manifest.segments[1].inputs == [f"{s}_0" for s in STATE_NAMES]
    assert max(worst) <= PARITY_TOLERANCE
    runner = OnnxRunner(load_bundle(tmp_path / "b"))
    state, first = runner.run_segment(0, runner.start(x.numpy()))
    state = runner.select(state, np.array([5, 2, 9]))  # compaction keeps all four tensors row-aligned
    _, second = runner.run_segment(1, state)
    with torch.no_grad():
        want = net(x)
    assert np.abs(first - want[0].numpy()).max() < PARITY_TOLERANCE
    assert np.abs(second - want[1][[5, 2, 9]].numpy()).max() < PARITY_TOLERANCE


def _tiny_fast_config(epochs: int) -> TrainConfig:
    return replace(apply_recipe(TrainConfig(), "fast"), epochs=epochs, batch_size=32, lr=0.5)


def test_the_fast_recipe_trains_a_cascade_and_resumes_with_its_lookahead(cifar_images, tmp_path) -> None:
    x, y = cifar_images
    data = Dataset(x[:192], y[:192], [str(i) for i in range(10)], "cifar10-fixture")
    val = Dataset(x[192:], y[192:], data.labels, "cifar10-fixture-val")
    config = _tiny_fast_config(epochs=3)
    assert (config.label_smoothing, config.crop_pad, config.schedule, config.lookahead) == (0.2, 2, "warmup-linear", True)
    torch.manual_seed(0)
    whole = cascade_net(TINY)
    history = train(whole, data, val, config, progress=False, log=lambda _: None, resume_path=tmp_path / "a.pt")
    assert history.epochs[-1].loss < history.epochs[0].loss
    assert float(whole.segments[0].stem.weight.abs().sum()) > 0  # the stem was fitted before training

    class Interrupted(Exception):
        pass

    def stop(message: str) -> None:
        if message.startswith("epoch   2"):
            raise Interrupted

    torch.manual_seed(0)
    with pytest.raises(Interrupted):
        train(cascade_net(TINY), data, val, config, progress=False, log=stop, resume_path=tmp_path / "b.pt")
    resumed = cascade_net(TINY)
    train(resumed, data, val, config, progress=False, log=lambda _: None, resume_path=tmp_path / "b.pt")
    for key, value in whole.state_dict().items():
        assert torch.allclose(value.float(), resumed.state_dict()[key].float(), atol=1e-5), key


def test_lookahead_ends_on_its_average_and_leaves_integer_buffers_alone() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    look = Lookahead(net, total_steps=10)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net[0].weight.add_(1.0)
    look.update(net, step=5)  # mid-run: pulled part of the way back to the average
    moved = net[0].weight - start["0.weight"]
    assert torch.all(moved > 0) and torch.all(moved < 1)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    look.update(net, step=10)  # the last step: the weights become the average
    assert torch.equal(net[0].weight, look.average["0.weight"])
    assert "1.num_batches_tracked" not in look.average
