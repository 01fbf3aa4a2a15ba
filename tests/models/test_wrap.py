"""exitserve.models.wrap: your own network as a multi-exit network, its exits trained, exported."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from exitserve.models.bundle import load_bundle
from exitserve.models.wrap import (
    Exportable,
    MultiExitNet,
    as_exportable,
    attach_exits,
    export_bundle,
    train_exits,
)


def backbone() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 4, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(4, 8, 3, padding=1)), ("relu2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(8, 3)),
    ]))


def test_exits_attach_by_name_or_index_and_the_last_exit_is_the_backbone() -> None:
    x = torch.rand(8, 1, 6, 6)
    model = backbone().eval()
    by_name = attach_exits(model, after=["relu1", "relu2"], example_inputs=x)
    by_index = attach_exits(model, after=[1, 3], example_inputs=x)
    assert isinstance(by_name, MultiExitNet) and by_name.num_exits == 3
    with torch.no_grad():
        logits = by_name.eval()(x)
        assert [tuple(z.shape) for z in logits] == [(8, 3)] * 3
        assert torch.equal(logits[-1], model(x))
        assert torch.equal(by_index.eval()(x)[-1], model(x))
    # the segments share the backbone's modules: nothing copied, fine-tuning one trains the other
    assert by_name.segments[0][0] is model.conv1
    assert by_name.heads[0].linear.in_features == 4 and by_name.heads[1].linear.in_features == 8


@pytest.mark.parametrize(("after", "message"), [
    (["conv9"], "no layer named 'conv9'"),
    (["relu2", "relu1"], "forward order"),
    ([6], "before the backbone's last layer"),
    ([40], "out of range"),
])
def test_bad_exit_points_are_refused(after: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        attach_exits(backbone(), after=after, example_inputs=torch.rand(8, 1, 6, 6))


def test_only_a_sequential_backbone_can_be_cut() -> None:
    with pytest.raises(TypeError, match="nn.Sequential"):
        attach_exits(nn.Linear(3, 3), after=[0], example_inputs=torch.rand(8, 3))  # type: ignore[arg-type]


def test_self_supervised_heads_train_without_labels_and_leave_the_backbone_alone() -> None:
    x = np.random.default_rng(0).random((64, 1, 6, 6), dtype=np.float32)
    net = attach_exits(backbone(), after=["relu1"], example_inputs=torch.from_numpy(x[:8]))
    frozen = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("heads.0")}
    head_before = net.heads[0].linear.weight.detach().clone()
    history = train_exits(net, x, None, regime="heads-only", epochs=2, lr=0.05, batch_size=16, augment=False,
                          log=lambda _: None)
    assert len(history.epochs) == 2
    assert not torch.equal(net.heads[0].linear.weight, head_before)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in frozen.items())
    with pytest.raises(ValueError, match="learns from labels"):
        train_exits(net, x, None, regime="joint", epochs=1)


def test_factory_results_are_checked_and_a_wrapped_net_exports(tmp_path) -> None:
    x = torch.rand(8, 1, 6, 6)
    net = attach_exits(backbone(), after=["relu1"], example_inputs=x)
    with pytest.raises(ValueError, match="not a multi-exit network"):
        as_exportable(backbone(), "f")
    with pytest.raises(ValueError, match="without example inputs"):
        as_exportable(net, "f")
    exportable = as_exportable(net, "f", example_inputs=x)
    assert isinstance(exportable, Exportable) and exportable.example_inputs is x
    manifest, worst = export_bundle(net, x, tmp_path / "b", labels=["a", "b", "c"], name="mine")
    assert manifest.num_exits == 2 and max(worst) < 1e-4
    assert load_bundle(tmp_path / "b").manifest.labels == ["a", "b", "c"]


def test_training_without_validation_data_says_so_instead_of_an_empty_list() -> None:
    x = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    net = attach_exits(backbone(), after=["relu1"], example_inputs=torch.from_numpy(x[:8]))
    lines: list[str] = []
    train_exits(net, x, np.arange(32) % 3, regime="joint", epochs=1, log=lines.append)
    assert len(lines) == 1 and "val acc per exit: (no validation data)" in lines[0]
    train_exits(net, x, np.arange(32) % 3, regime="joint", epochs=1, val=(x, np.arange(32) % 3), log=lines.append)
    assert "%" in lines[1].split("val acc per exit:")[1]
