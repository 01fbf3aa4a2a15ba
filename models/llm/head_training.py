"""Training exit heads on cached hidden states against the frozen model's own next-token predictions.

Two losses, chosen by measurement (BENCHMARKS.md): `ce` is the seed paper's CE(head, full argmax)
- lambda * entropy; `kl` is KL(full || head) over the head vocabulary (the full distribution
renormalised to it), at a temperature T (both distributions softened by T, the loss scaled by T²
as in distillation).

A head with an outside estimate (`ExitHead.outside`) learns it with the same loss over K + 1
classes: for `ce` a token whose full prediction lies outside the vocabulary has the class "outside",
for `kl` the full model's mass outside the vocabulary is that class's (the full LM head is run on
the batch for it). A head after the final layer (`frozen_vocab`) keeps its exact K logits and trains
only the outside estimate. Heads without one train as before: `ce` skips outside tokens, `kl` spreads
their mass over the vocabulary as the full model spreads it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from exitserve.models.llm.heads import ExitHeads
from exitserve.models.llm.llama import LlamaModel


@dataclass(frozen=True)
class HeadTrainConfig:
    loss: str = "kl"
    steps: int = 400
    batch_size: int = 256
    lr: float = 2e-3
    entropy_weight: float = 0.1
    temperature: float = 1.0  # kl only
    seed: int = 0


def full_head_logits(model: LlamaModel, heads: ExitHeads, last_hidden: torch.Tensor) -> torch.Tensor:
    """The full model's logits restricted to the head vocabulary, from the last layer's hidden states;
    with an outside estimate to learn, the log-sum-exp of every other token's logit as column K."""
    normed = model.model.norm(last_hidden.float())
    restricted = normed @ heads.bound_rows().T
    if not heads.outside_rows:
        return restricted
    full = normed @ model.lm_head.weight.T
    full[:, heads.vocab] = float("-inf")
    return torch.cat([restricted, torch.logsumexp(full, dim=-1, keepdim=True)], dim=-1)


def train_head(model: LlamaModel, heads: ExitHeads, index: int, hidden: torch.Tensor, last_hidden: torch.Tensor,
               full_argmax: torch.Tensor, config: HeadTrainConfig, *, frozen_vocab: bool = False,
               log=print) -> list[float]:
    """Train head `index` on hidden states [n, width] (float16 ok); returns the loss per 50 steps.
    `frozen_vocab`: train only the outside estimate (the head after the final layer)."""
    generator = torch.Generator().manual_seed(config.seed + index)
    head = heads.exit_heads[index]
    if frozen_vocab and head.outside is None:
        return []  # nothing to train: the head is the model's own norm and rows
    head.train()
    trained = head.outside.parameters() if frozen_vocab and head.outside is not None else head.parameters()
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.1)
    outside_class = heads.vocab_size if heads.outside_rows else -1  # -1: the token is skipped (no outside class)
    columns = torch.full((model.config.vocab_size,), outside_class, dtype=torch.int64)
    columns[heads.vocab] = torch.arange(heads.vocab_size)
    target_column = columns[full_argmax]
    usable = torch.arange(hidden.shape[0]) if config.loss == "kl" else torch.nonzero(target_column >= 0)[:, 0]
    history, running, start = [], 0.0, time.perf_counter()
    for step in range(config.steps):
        batch = usable[torch.randint(usable.numel(), (config.batch_size,), generator=generator)]
        logits = heads.logits(index, hidden[batch].float())
        if config.loss == "kl":
            t = config.temperature
            with torch.no_grad():
                target = F.log_softmax(full_head_logits(model, heads, last_hidden[batch]) / t, dim=-1)
            loss = F.kl_div(F.log_softmax(logits / t, dim=-1), target, log_target=True, reduction="batchmean") * t * t
        elif config.loss == "ce":
            log_p = F.log_softmax(logits, dim=-1)
            entropy = -(log_p.exp() * log_p).sum(-1).mean()
            loss = F.cross_entropy(logits, target_column[batch]) - config.entropy_weight * entropy
        else:
            raise ValueError(f"unknown loss {config.loss!r}; choose kl or ce")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running += float(loss.detach())
        if (step + 1) % 50 == 0:
            history.append(running / 50)
            running = 0.0
    head.eval()
    log(f"  head {index}: {config.steps} steps ({config.loss}) in {time.perf_counter() - start:.0f} s, "
        f"final loss {history[-1] if history else float('nan'):.3f}")
    return history


@torch.inference_mode()
def head_logits(heads: ExitHeads, index: int, hidden: torch.Tensor, chunk: int = 2048) -> np.ndarray:
    out = [heads.logits(index, hidden[i: i + chunk].float()).numpy() for i in range(0, hidden.shape[0], chunk)]
    return np.concatenate(out)


def agreement_report(logits: np.ndarray, vocab: np.ndarray, full_argmax: np.ndarray) -> dict[str, float]:
    """Top-1 agreement with the full model, and the agreement of tokens with max probability >= 0.9
    (the probability in the calibration class space: the outside estimate lowers it)."""
    from exitserve.models.llm.heads import calibration_logits
    from exitserve.service.serving.generation.calibrate import agreement

    agree = agreement(logits, vocab, full_argmax)
    scores = calibration_logits(logits, vocab.size)
    z = scores - scores.max(1, keepdims=True)
    conf = 1.0 / np.exp(z).sum(1)
    sure = conf >= 0.9
    return {"agreement": float(agree.mean()), "share_conf_0.9": float(sure.mean()),
            "agreement_conf_0.9": float(agree[sure].mean()) if sure.any() else float("nan")}
