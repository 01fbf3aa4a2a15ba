"""Writing the manifest of a generation bundle (torch-free: only file names, config numbers and checksums)."""

from __future__ import annotations

import json
from pathlib import Path

from exitserve.models.bundle import SCHEMA_VERSION, Manifest, write_manifest

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
HEADS_FILE = "heads.safetensors"


def layer_flops(config: dict) -> int:
    """Multiply-adds x 2 per token of one decoder layer's matrices (attention over the context excluded)."""
    h, i, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    attention = h * config["num_heads"] * d * 2 + h * config["num_kv_heads"] * d * 2
    return 2 * (attention + 3 * h * i)


def head_flops(config: dict, head_vocab: int, head_hidden: int) -> int:
    h = config["hidden_size"]
    return 2 * (2 * h * head_hidden + h * head_vocab)


def write_generation_manifest(
    directory: Path,
    *,
    name: str,
    exit_layers: list[int],
    head_vocab_size: int = 0,
    head_hidden: int = 0,
    bos_id: int | None,
    eos_ids: list[int],
    max_context: int,
    command: str,
    data_fingerprint: str = "",
    extra: dict | None = None,
    version: str = "1",
) -> Manifest:
    """Manifest of the files now in `directory`: one segment per exit, segment k = layers up to exit_layers[k]."""
    from exitserve import __version__

    config = json.loads((directory / CONFIG_FILE).read_text())
    num_layers = config["num_layers"]
    if not exit_layers or exit_layers[-1] != num_layers - 1:
        raise ValueError(f"the last exit must sit after the final layer {num_layers - 1}, got {exit_layers}")
    per_layer = layer_flops(config)
    segments, exits, cumulative, previous = [], [], 0, -1
    for k, layer in enumerate(exit_layers):
        last = k == len(exit_layers) - 1
        head = 2 * config["hidden_size"] * config["vocab_size"] if last else head_flops(config, head_vocab_size, head_hidden)
        flops = (layer - previous) * per_layer + head
        cumulative += flops
        inputs = ["input_ids"] if k == 0 else [f"hidden_{k - 1}"]
        outputs = ([] if last else [f"hidden_{k}"]) + [f"logits_{k}"]
        segments.append({"file": WEIGHTS_FILE, "inputs": inputs, "outputs": outputs, "logits": f"logits_{k}", "flops": flops})
        exits.append({"index": k, "after_segment": k, "cumulative_flops": cumulative})
        previous = layer
    kv_shape = [config["num_kv_heads"], -1, config["head_dim"]]
    fields = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "task": "text-generation",
        "input": {"name": "input_ids", "shape": [-1, -1], "dtype": "int64"},
        "labels": [],
        "segments": segments,
        "exits": exits,
        "sha256": {},
        "created_by": {"exitserve_version": __version__, "command": command, "data_fingerprint": data_fingerprint,
                       "extra": extra or {}},
        "generation": {
            "config": CONFIG_FILE,
            "weights": WEIGHTS_FILE,
            "tokenizer": TOKENIZER_FILE,
            "chat_template": CHAT_TEMPLATE_FILE if (directory / CHAT_TEMPLATE_FILE).is_file() else None,
            "heads": HEADS_FILE if (directory / HEADS_FILE).is_file() else None,
            "exit_layers": list(exit_layers),
            "head_vocab_size": head_vocab_size,
            "bos_id": bos_id,
            "eos_ids": list(eos_ids),
            "max_context": max_context,
            "kv_cache": {"layers": num_layers, "keys": kv_shape, "values": kv_shape},
        },
    }
    return write_manifest(directory, fields)
