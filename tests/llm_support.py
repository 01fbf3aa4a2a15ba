"""A tiny Llama-shaped decoder with random weights, exit heads and label-free tables, built in seconds."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from exitserve.calibration import Calibration
from exitserve.models.llm.heads import ExitHeads
from exitserve.models.llm.llama import LlamaConfig, LlamaModel
from exitserve.service.serving.generation.calibrate import fit_token_calibration

TINY = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_layers=6, num_heads=4, num_kv_heads=2,
                   head_dim=12, rms_norm_eps=1e-5, rope_theta=10000.0, max_positions=512, tie_word_embeddings=True)
EXIT_LAYERS = [1, 3, 5]
# head size 16, a multiple of 8: ONNX Runtime's GroupQueryAttention, and so fused segments, need one
FUSABLE = replace(TINY, head_dim=16)


def tiny_model(seed: int = 0, config: LlamaConfig = TINY) -> LlamaModel:
    torch.manual_seed(seed)
    model = LlamaModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:  # wide enough that logits are far from ties: greedy comparisons stay meaningful
                p.normal_(0.0, 0.3 if "embed" in name else 0.15)
    return model.eval().requires_grad_(False)


def tiny_heads(model: LlamaModel, vocab_size: int = 64, seed: int = 1,
               exit_layers: list[int] = EXIT_LAYERS, outside_rows: int = 8) -> ExitHeads:
    """Random residual heads; a head after the final layer stays the model's own norm + LM-head rows.
    `outside_rows` 0: heads as saved before they estimated the mass outside their vocabulary."""
    torch.manual_seed(seed)
    heads = ExitHeads(model.config.hidden_size, 32, model.config.rms_norm_eps, torch.arange(vocab_size),
                      len(exit_layers) - 1, outside_rows=outside_rows).init_from(model)
    with torch.no_grad():
        for head, layer in zip(heads.heads, exit_layers, strict=False):
            if layer < model.config.num_layers - 1:
                head.down.weight.normal_(0.0, 0.05)
    return heads.eval().requires_grad_(False)


def tiny_calibration(model: LlamaModel, heads: ExitHeads, tokens: int = 3000, seed: int = 2,
                     exit_layers: list[int] = EXIT_LAYERS) -> Calibration:
    """Tables counted on random token streams, teacher-forced (what the real pipeline does on WikiText)."""
    generator = torch.Generator().manual_seed(seed)
    per_exit: list[list[np.ndarray]] = [[] for _ in exit_layers[:-1]]
    full = []
    for _ in range(tokens // 100):
        ids = torch.randint(model.config.vocab_size, (100,), generator=generator)
        logits, hidden = model(ids, hidden_layers=exit_layers[:-1])
        with torch.no_grad():
            for k, h in enumerate(hidden):
                per_exit[k].append(heads.logits(k, h).numpy())
        full.append(logits.argmax(-1).numpy())
    return fit_token_calibration([np.concatenate(z) for z in per_exit], heads.vocab.numpy(), np.concatenate(full),
                                 model.config.vocab_size, bins=10)


def random_prompts(count: int, seed: int = 3, vocab: int = TINY.vocab_size) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, 12))).tolist() for _ in range(count)]


END_ID = 95
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def char_tokenizer(end_of_text: int | None = None):
    """Printable ASCII, one token per character (ids 0..94), plus <|end|> (95): the tiny model's vocabulary.

    `end_of_text`: that id is `<|endoftext|>` instead of its character (a token that is no eos id)."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {chr(c): c - 32 for c in range(32, 127) if c - 32 != end_of_text}
    vocab["<|end|>"] = END_ID
    special = ["<|end|>"]
    if end_of_text is not None:
        vocab["<|endoftext|>"] = end_of_text
        special.append("<|endoftext|>")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens(special)
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


def write_tiny_generation_bundle(directory, *, with_exits: bool = True, max_context: int = 256,
                                 end_of_text: int | None = None, outside_rows: int = 8, config: LlamaConfig = TINY):
    """A complete generation bundle of the tiny model: weights, tokenizer, chat template, heads, tables."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from exitserve.models.llm.manifest import write_generation_manifest
    from exitserve.service.serving.generation.build import write_exits

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = tiny_model(config=config)
    (directory / "config.json").write_text(json.dumps(config.to_json()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(directory / "model.safetensors"))
    char_tokenizer(end_of_text).save(str(directory / "tokenizer.json"))
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    write_generation_manifest(directory, name="tiny-llm", exit_layers=[config.num_layers - 1], bos_id=None,
                              eos_ids=[END_ID], max_context=max_context, command="tests")
    if with_exits:
        heads = tiny_heads(model, outside_rows=outside_rows)
        write_exits(directory, heads, tiny_calibration(model, heads), EXIT_LAYERS, command="tests")
    return directory


def tiny_parts() -> tuple[LlamaModel, ExitHeads, Calibration]:
    """The tiny model, its exit heads and label-free tables: what the decoder tests run on."""
    model = tiny_model()
    heads = tiny_heads(model)
    return model, heads, tiny_calibration(model, heads)
