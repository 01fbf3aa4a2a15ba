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
    outside_column,
    vocab_index,
)
from exitserve.models.llm.hidden_cache import cache_hidden
from exitserve.service.serving.generation.build import select_exits, token_groups
from exitserve.service.serving.generation.calibrate import agreement, fit_token_calibration


def test_vocabulary_choice_and_columns():
    argmax = np.array([5, 5, 5, 7, 7, 9, 1])
    vocab = choose_vocab(argmax, 3, always=[0])
    assert vocab.tolist() == [0, 5, 7]  # forced token first, then by frequency
    columns = vocab_index(vocab, 12)
    reference = outside_column(3)
    assert columns[5] == 1 and columns[9] == reference and columns[0] == 0
    z = calibration_logits(np.zeros((2, 3), dtype=np.float32), 3)  # a head saved without an outside estimate
    assert z.shape == (2, reference + 1) and z[:, 3:].max() < -1e3
    assert one_hot_logits(np.array([reference, 1]), 3).argmax(1).tolist() == [reference, 1]


def test_the_outside_estimate_lowers_confidence_but_is_never_a_prediction_when_sure():
    from exitserve.calibration.confidence import softmax

    # in-set logits 0, 0, 4; the outside mass: none, as much as the top token, 50x the top token
    head = np.array([[0, 0, 4, -1e4], [0, 0, 4, 4], [0, 0, 4, 4 + np.log(50)]], dtype=np.float32)
    probs = softmax(calibration_logits(head, 3))
    assert probs[:, :3].argmax(1).tolist() == [2, 2, 2]
    top = probs.max(1)
    assert top[0] > 0.96 and abs(top[1] - probs[1, 2]) < 1e-12 and 0.45 < top[1] < 0.5  # half the mass is outside
    assert probs.argmax(1)[2] == 2 and top[2] < 0.02  # 50x outside: 1/64 of it is still below the top token
    assert abs(probs[1].sum() - 1.0) < 1e-9 and probs[:, -1].max() < 1e-9  # the reference column: never predicted
    assert agreement(head, np.array([5, 6, 7]), np.array([7, 7, 7])).tolist() == [True, True, True]
    sure_outside = np.array([[0, 0, 0, 12]], dtype=np.float32)  # the head says: the token is not one of mine
    assert agreement(sure_outside, np.array([5, 6, 7]), np.array([5])).tolist() == [False]


def test_the_outside_estimate_learns_where_the_vocabulary_misses():
    """After the final layer the K logits are exact; trained, the outside estimate makes the head unsure
    exactly where the full model's token lies outside its set, and keeps it sure elsewhere."""
    model = tiny_model()
    ids = np.random.default_rng(1).integers(0, TINY.vocab_size, 5000)
    cache = cache_hidden(model, ids, [5], context=200, progress=False)
    train, held = slice(0, 4000), slice(4000, 5000)
    vocab = choose_vocab(cache.full_argmax[train].numpy(), 40)  # many tokens outside
    heads = ExitHeads(TINY.hidden_size, 32, TINY.rms_norm_eps, torch.from_numpy(vocab), 1).init_from(model)
    no_outside = ExitHeads(TINY.hidden_size, 32, TINY.rms_norm_eps, torch.from_numpy(vocab), 1,
                           outside_rows=0).init_from(model)
    full = cache.full_argmax[held].numpy()
    outside = ~np.isin(full, vocab)
    assert 0.1 < outside.mean() < 0.9
    train_head(model, heads, 0, cache.hidden[5][train], cache.hidden[5][train], cache.full_argmax[train],
               HeadTrainConfig(loss="ce", steps=300, batch_size=128, lr=1e-2), frozen_vocab=True, log=lambda *_: None)
    exact = head_logits(heads, 0, cache.hidden[5][held])
    np.testing.assert_allclose(exact[:, :40], head_logits(no_outside, 0, cache.hidden[5][held]), atol=1e-4)

    def confidence(z):
        s = calibration_logits(z, vocab.size)
        s = s - s.max(1, keepdims=True)
        return 1.0 / np.exp(s).sum(1)

    before, after = confidence(head_logits(no_outside, 0, cache.hidden[5][held])), confidence(exact)
    drop_outside = after[outside].mean() / before[outside].mean()
    drop_inside = after[~outside].mean() / before[~outside].mean()
    assert drop_outside < 0.7 and drop_inside > drop_outside + 0.1, (drop_outside, drop_inside)
    agrees = agreement(exact, vocab, full)
    top = full.size // 4  # the most confident quarter disagrees less than half as often, ranked with the estimate
    assert 1 - agrees[np.argsort(-after)[:top]].mean() < 0.5 * (1 - agrees[np.argsort(-before)[:top]].mean())


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
    agrees = agreement(logits[1], vocab, full)
    assert counts.sum() == full.size and correct.sum() == agrees.sum()  # "correct" = equals the full model's token
    last_counts, last_correct = calibration.counts(2)
    assert last_correct.sum() == last_counts.sum() == full.size  # the full model agrees with itself
    per_exit = [calibration_logits(z, 48) for z in logits] + [one_hot_logits(vocab_index(vocab, TINY.vocab_size)[full], 48)]
    d = decide_all(calibration, "pcee", per_exit, 0.5)
    early = d.exit_index < 2
    assert (d.prediction[~early] == vocab_index(vocab, TINY.vocab_size)[full][~early]).all()

    chosen = select_exits({1: logits[0], 3: logits[1]}, vocab, full, TINY.vocab_size, TINY.num_layers,
                          check_cost=0.1, max_exits=2, log=lambda *_: None)
    assert chosen == sorted(chosen) and set(chosen) <= {1, 3}

    # tokens counted in clusters (issue 28): the stored design effect is measured, and guards get no looser
    groups = token_groups(600, [100, 150, 150])
    assert groups.shape == full.shape and groups.max() == 2 + 2 and (groups[600:700] == 2).all()
    clustered = fit_token_calibration(logits, vocab, full, TINY.vocab_size, bins=5, groups=groups)
    assert clustered.design_effect >= 1.0 and clustered.to_dict()["design_effect"] == clustered.design_effect
    for policy in ("pcee-lb-tail", "pcee-lb"):
        assert (decide_all(clustered, policy, per_exit, 0.8).exit_index >= decide_all(calibration, policy, per_exit, 0.8).exit_index).all()


def test_cost_measurement_runs_the_decoder_and_returns_layer_equivalents():
    from llm_support import tiny_calibration, tiny_heads

    from exitserve.service.serving.generation.build import measure_costs

    model = tiny_model()
    heads = tiny_heads(model)
    check, lm_head = measure_costs(model, heads, [1, 3], tiny_calibration(model, heads, tokens=600), [3, 4, 5],
                                   tokens=3, rounds=1)
    assert np.isfinite(check) and check >= 0.0 and np.isfinite(lm_head) and lm_head > 0.0
