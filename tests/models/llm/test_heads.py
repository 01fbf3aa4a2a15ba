"""Exit heads, their training, label-free tables and the exit-layer selection, on the tiny decoder."""

from __future__ import annotations

import numpy as np
import torch
from llm_support import TINY, tiny_model

from exitserve.calibration import decide_all
from exitserve.models.llm.head_training import HeadTrainConfig, agreement_report, head_logits, train_head
from exitserve.models.llm.heads import (
    ExitHeads,
    calibration_logits,
    choose_vocab,
    one_hot_logits,
    vocab_index,
)
from exitserve.models.llm.hidden_cache import cache_hidden
from exitserve.service.serving.generation.build import select_exits
from exitserve.service.serving.generation.calibrate import fit_token_calibration


def test_vocabulary_choice_and_columns():
    argmax = np.array([5, 5, 5, 7, 7, 9, 1])
    vocab = choose_vocab(argmax, 3, always=[0])
    assert vocab.tolist() == [0, 5, 7]  # forced token first, then by frequency
    columns = vocab_index(vocab, 12)
    assert columns[5] == 1 and columns[9] == 3 and columns[0] == 0  # 3 = "outside"
    z = calibration_logits(np.zeros((2, 3), dtype=np.float32))
    assert z.shape == (2, 4) and z[:, 3].max() < -1e3
    assert one_hot_logits(np.array([3, 1]), 3).argmax(1).tolist() == [3, 1]


def test_training_raises_agreement_and_tables_count_it():
    model = tiny_model()
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, 6000)
    cache = cache_hidden(model, ids, [1, 3], context=200, progress=False)
    train, held = slice(0, 5000), slice(5000, 6000)
    vocab = choose_vocab(cache.full_argmax[train].numpy(), 48)
    heads = ExitHeads(TINY.hidden_size, 32, TINY.rms_norm_eps, torch.from_numpy(vocab), 2).init_from(model)
    full = cache.full_argmax[held].numpy()
    before = agreement_report(head_logits(heads, 1, cache.hidden[3][held]), vocab, full)["agreement"]
    for k, layer in enumerate([1, 3]):
        train_head(model, heads, k, cache.hidden[layer][train], cache.hidden[5][train], cache.full_argmax[train],
                   HeadTrainConfig(loss="ce", steps=400, batch_size=128, lr=5e-3), log=lambda *_: None)
    logits = [head_logits(heads, k, cache.hidden[layer][held]) for k, layer in enumerate([1, 3])]
    after = agreement_report(logits[1], vocab, full)["agreement"]
    assert after > before + 0.05, (before, after)

    calibration = fit_token_calibration(logits, vocab, full, TINY.vocab_size, bins=5)
    counts, correct = calibration.counts(1)
    agrees = vocab[logits[1].argmax(1)] == full
    assert counts.sum() == full.size and correct.sum() == agrees.sum()  # "correct" = equals the full model's token
    last_counts, last_correct = calibration.counts(2)
    assert last_correct.sum() == last_counts.sum() == full.size  # the full model agrees with itself
    per_exit = [calibration_logits(z) for z in logits] + [one_hot_logits(vocab_index(vocab, TINY.vocab_size)[full], 48)]
    d = decide_all(calibration, "pcee", per_exit, 0.5)
    early = d.exit_index < 2
    assert (d.prediction[~early] == vocab_index(vocab, TINY.vocab_size)[full][~early]).all()

    chosen = select_exits({1: logits[0], 3: logits[1]}, vocab, full, TINY.vocab_size, TINY.num_layers,
                          check_cost=0.1, max_exits=2, log=lambda *_: None)
    assert chosen == sorted(chosen) and set(chosen) <= {1, 3}


def test_cost_measurement_runs_the_decoder_and_returns_layer_equivalents():
    from llm_support import tiny_calibration, tiny_heads

    from exitserve.service.serving.generation.build import measure_costs

    model = tiny_model()
    heads = tiny_heads(model)
    check, lm_head = measure_costs(model, heads, [1, 3], tiny_calibration(model, heads, tokens=600), [3, 4, 5],
                                   tokens=3, rounds=1)
    assert np.isfinite(check) and check >= 0.0 and np.isfinite(lm_head) and lm_head > 0.0
