import numpy as np
import pytest
import torch

from exitserve.models.architectures import build_architecture
from exitserve.models.data import load_dataset
from exitserve.models.recipes import apply_recipe
from exitserve.models.training import TrainConfig, exit_losses, per_exit_accuracy, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits:train"), load_dataset("digits:val")


@pytest.mark.parametrize("regime", ["joint", "mixed"])
def test_regime_lowers_loss(digits, regime: str) -> None:
    train_data, val_data = digits
    torch.manual_seed(0)
    net = build_architecture("digits-compact", 10)
    history = train(net, train_data, val_data, TrainConfig(regime=regime, epochs=4, batch_size=64, lr=0.1),
                    progress=False, log=lambda _: None)
    losses = [e.loss for e in history.epochs]
    if regime == "mixed":
        assert [e.phase for e in history.epochs] == ["backbone", "backbone", "joint", "joint"]
        losses = losses[2:]  # the joint phase adds the early heads' terms: compare within a phase
    assert losses[-1] < losses[0]
    assert history.final_val_accuracy[-1] > 0.5


def test_heads_only_trains_only_early_heads(digits) -> None:
    train_data, val_data = digits
    torch.manual_seed(0)
    net = build_architecture("digits-compact", 10)
    train(net, train_data, val_data, TrainConfig(regime="joint", epochs=3, batch_size=64, lr=0.1),
          progress=False, log=lambda _: None)
    frozen = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(("segments.", "heads.2."))}
    for head in net.heads[:-1]:  # start the exit heads from scratch
        for module in head.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    history = train(net, train_data, val_data,
                    TrainConfig(regime="heads-only", epochs=3, batch_size=64, lr=0.05, entropy_weight=0.1),
                    progress=False, log=lambda _: None)
    assert history.epochs[-1].loss < history.epochs[0].loss
    after = net.state_dict()
    for key, before in frozen.items():
        assert torch.equal(before, after[key]), f"{key} changed although the backbone is frozen"


def test_heads_only_loss_is_ce_against_final_predictions_minus_entropy() -> None:
    logits = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 3.0], [0.0, 3.0]])]
    config = TrainConfig(regime="heads-only", entropy_weight=0.5)
    pseudo = torch.tensor([1, 1])  # the final exit predicts class 1 for both samples
    p = torch.softmax(logits[0], 1)
    ce = torch.nn.functional.cross_entropy(logits[0], pseudo)
    ent = -(p * p.log()).sum(1).mean()
    got = exit_losses(logits, torch.tensor([0, 0]), "heads-only", "heads-only", config)
    assert torch.isclose(got, ce - 0.5 * ent)


def test_per_exit_accuracy_counts_correct_samples(digits) -> None:
    _, val_data = digits
    net = build_architecture("digits-compact", 10)
    acc = per_exit_accuracy(net, val_data)
    assert len(acc) == 3 and all(0.0 <= a <= 1.0 for a in acc)
    logits = net.eval()(torch.from_numpy(val_data.x))
    assert np.isclose(acc[-1], (logits[-1].argmax(1).numpy() == val_data.y).mean())


def test_self_distillation_with_gradient_equilibrium_trains(digits) -> None:
    train_data, val_data = digits
    torch.manual_seed(0)
    net = build_architecture("digits-compact", 10)
    config = apply_recipe(TrainConfig(epochs=4, batch_size=64, lr=0.1), "sd-ge")
    assert config.distill_weight > 0 and config.gradient_equilibrium
    history = train(net, train_data, val_data, config, progress=False, log=lambda _: None)
    assert history.epochs[-1].loss < history.epochs[0].loss
    assert min(history.final_val_accuracy) > 0.5


class _Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_weights(digits, tmp_path) -> None:
    train_data, val_data = digits
    config = apply_recipe(TrainConfig(epochs=4, batch_size=64, lr=0.1, backbone_epochs=2), "sd-mixed")

    torch.manual_seed(0)
    whole = build_architecture("digits-compact", 10)
    train(whole, train_data, val_data, config, progress=False, log=lambda _: None, resume_path=tmp_path / "a.pt")

    def stop_in_phase_two(message: str) -> None:
        if message.startswith("epoch   3"):
            raise _Interrupted

    torch.manual_seed(0)
    first = build_architecture("digits-compact", 10)
    with pytest.raises(_Interrupted):
        train(first, train_data, val_data, config, progress=False, log=stop_in_phase_two, resume_path=tmp_path / "b.pt")
    torch.manual_seed(1)  # a fresh process: other initial weights, which the resume state replaces
    resumed = build_architecture("digits-compact", 10)
    messages: list[str] = []
    history = train(resumed, train_data, val_data, config, progress=False, log=messages.append, resume_path=tmp_path / "b.pt")
    assert messages[0].startswith("resuming") and "after epoch 3" in messages[0]
    assert [e.epoch for e in history.epochs] == [1, 2, 3, 4]
    assert [e.phase for e in history.epochs] == ["backbone", "backbone", "joint", "joint"]
    for key, value in whole.state_dict().items():
        assert torch.allclose(value.float(), resumed.state_dict()[key].float(), atol=1e-5), key
    with pytest.raises(ValueError, match="another configuration"):
        train(resumed, train_data, val_data, TrainConfig(epochs=5), progress=False, log=lambda _: None,
              resume_path=tmp_path / "b.pt")
