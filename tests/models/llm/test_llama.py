"""Our Llama module against transformers' LlamaForCausalLM with the same weights (tiny, random)."""

from __future__ import annotations

import torch
from llm_support import TINY, tiny_model
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

from exitserve.models.llm.llama import LayerSpan, load_llama


def _hf_twin(model) -> LlamaForCausalLM:
    c = model.config
    hf = LlamaForCausalLM(HFConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_positions, tie_word_embeddings=True,
    ))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf.eval()


def test_logits_match_transformers():
    model = tiny_model()
    hf = _hf_twin(model)
    ids = torch.randint(TINY.vocab_size, (37,), generator=torch.Generator().manual_seed(0))
    ours, _ = model(ids)
    with torch.no_grad():
        theirs = hf(ids[None]).logits[0]
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_incremental_cache_matches_one_pass():
    """Feeding tokens one by one through the cache gives the same logits as one teacher-forced pass."""
    model = tiny_model()
    ids = torch.randint(TINY.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    full, _ = model(ids)
    cache, rotary = model.new_cache(32), model.rotary()
    rows = []
    for position in range(ids.shape[0]):
        x = model.embed(ids[position: position + 1])
        for layer, (keys, values) in zip(model.layers, cache, strict=True):
            x = layer.run(x, [LayerSpan.starting_at((0, 1), position, keys, values)], rotary)
        rows.append(model.logits(x))
    assert torch.allclose(torch.cat(rows), full, atol=1e-4)


def test_save_and_load_roundtrip(tmp_path):
    import json

    from safetensors.torch import save_file

    model = tiny_model()
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_json()))
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    again = load_llama(tmp_path)
    ids = torch.arange(10)
    assert torch.equal(model(ids)[0], again(ids)[0])
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()  # still tied


def test_decoding_attention_fast_path_equals_sdpa():
    """One new row per sequence (a decoding step) takes the numpy path; it computes what SDPA does
    and writes the same keys and values into each sequence's cache."""
    from exitserve.models.llm.llama import _attend_one_row_each, _attend_sdpa

    torch.manual_seed(0)
    c = TINY
    lengths = [0, 5, 17, 40]
    q = torch.randn(len(lengths), c.num_heads, c.head_dim)
    k, v = torch.randn(len(lengths), c.num_kv_heads, c.head_dim), torch.randn(len(lengths), c.num_kv_heads, c.head_dim)

    def spans():
        caches = [(torch.randn(c.num_kv_heads, 64, c.head_dim, generator=torch.Generator().manual_seed(n)),
                   torch.randn(c.num_kv_heads, 64, c.head_dim, generator=torch.Generator().manual_seed(n + 100)))
                  for n in lengths]
        return [LayerSpan.starting_at((i, i + 1), n, *cache) for i, (n, cache) in enumerate(zip(lengths, caches, strict=True))]

    fast, reference = spans(), spans()
    torch.testing.assert_close(_attend_one_row_each(q, k, v, fast), _attend_sdpa(q, k, v, reference), atol=1e-5, rtol=1e-5)
    for a, b in zip(fast, reference, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_attention_never_reads_positions_back_from_the_device():
    """On a GPU such a read waits for the device once per sequence and layer (it cost 50 ms a token on
    an H200): positions live on the meta device here, where any read fails."""
    from exitserve.models.llm.llama import attend

    c = TINY
    q = torch.randn(2, c.num_heads, c.head_dim, dtype=torch.float64)  # float64: the SDPA path, as on a GPU
    k = torch.randn(2, c.num_kv_heads, c.head_dim, dtype=torch.float64)
    v = torch.randn(2, c.num_kv_heads, c.head_dim, dtype=torch.float64)
    spans = []
    for row, start in enumerate((3, 9)):
        keys, values = (torch.zeros(c.num_kv_heads, 16, c.head_dim, dtype=torch.float64) for _ in range(2))
        spans.append(LayerSpan((row, row + 1), start, keys, values, torch.empty(1, dtype=torch.int64, device="meta")))
    out = attend(q, k, v, spans)
    assert out.shape == (2, c.num_heads * c.head_dim)
    assert torch.equal(spans[1].keys[:, 9], k[1]) and not spans[1].keys[:, 10].any()
