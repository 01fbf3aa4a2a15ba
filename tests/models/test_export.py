import numpy as np
import pytest
import torch
from torch import nn

from exitserve.models.architectures import build_architecture
from exitserve.models.bundle import load_bundle
from exitserve.models.data import load_dataset
from exitserve.models.export import PARITY_TOLERANCE, ExportParityError, export_bundle, verify_parity
from exitserve.models.net import MultiExitNet
from exitserve.service.runners.onnx_runtime import OnnxRunner


@pytest.fixture(scope="module")
def digits_val():
    return load_dataset("digits:val")


def test_export_parity_on_real_inputs(tmp_path, digits_val) -> None:
    torch.manual_seed(0)
    net = build_architecture("digits-compact", 10).eval()
    x = torch.from_numpy(digits_val.x[:16])
    manifest, worst = export_bundle(net, x, tmp_path / "b", labels=digits_val.labels, name="digits")
    assert len(worst) == 3 and max(worst) <= PARITY_TOLERANCE
    assert manifest.input.shape == [-1, 1, 8, 8]
    # The chained ONNX graphs reproduce every exit of the PyTorch model on other inputs too.
    runner = OnnxRunner(load_bundle(tmp_path / "b"))
    got = runner.run_all_exits(digits_val.x[16:80], batch_size=13, progress=False)
    with torch.no_grad():
        want = net(torch.from_numpy(digits_val.x[16:80]))
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w.numpy()).max() < PARITY_TOLERANCE


def test_parity_check_catches_a_graph_that_differs(tmp_path, digits_val) -> None:
    net = build_architecture("digits-compact", 10).eval()
    x = torch.from_numpy(digits_val.x[:8])
    manifest, _ = export_bundle(net, x, tmp_path / "b", labels=digits_val.labels)
    with torch.no_grad():
        net.heads[1].classifier.bias += 0.01  # PyTorch now disagrees with the exported graph
    with pytest.raises(ExportParityError, match="segment 1"):
        verify_parity(net, tmp_path / "b", manifest, (x,))


class _Embed(nn.Module):
    """Returns two tensors, like a transformer layer passing hidden states and a mask."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2.0, (x > 0).float()


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 6)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.relu(self.linear(hidden)) * mask, mask


class _MaskedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden * mask)


def test_segments_may_pass_several_named_tensors(tmp_path) -> None:
    torch.manual_seed(0)
    net = MultiExitNet([_Embed(), _Layer(), _Layer()], [_MaskedHead(), _MaskedHead(), _MaskedHead()],
                       state_names=("hidden", "mask")).eval()
    x = torch.randn(9, 6)
    manifest, worst = export_bundle(net, x, tmp_path / "b", labels=["a", "b", "c"])
    assert manifest.segments[0].outputs == ["hidden_0", "mask_0", "logits_0"]
    assert manifest.segments[1].inputs == ["hidden_0", "mask_0"]
    assert manifest.segments[2].outputs == ["logits_2"]
    assert max(worst) <= PARITY_TOLERANCE
    runner = OnnxRunner(load_bundle(tmp_path / "b"))
    state = runner.start(x.numpy())
    state, _ = runner.run_segment(0, state)
    state = runner.select(state, np.array([4, 1]))  # compaction keeps both tensors row-aligned
    _, logits = runner.run_segment(1, state)
    with torch.no_grad():
        want = net(x[[4, 1]])[1]
    assert np.abs(logits - want.numpy()).max() < PARITY_TOLERANCE
