"""llama.cpp as the CPU peer: greedy decoding speed of a GGUF through `llama-cpp-python`.

Run by `benchmarks/llm_precision.py` with the Python of an environment that has `llama-cpp-python`
(built from its PyPI source distribution; it needs no other package), so exitserve's own
environment does not depend on it:

    PEER_PYTHON -m pip install llama-cpp-python
    PEER_PYTHON benchmarks/llamacpp_peer.py --gguf FILE --prompts prompts.json --new-tokens 64 --streams 1
    PEER_PYTHON benchmarks/llamacpp_peer.py --quantize FILE --to q8_0 --out FILE   # requantise (Q8_0/F16)

Prints one JSON object. Streams > 1: one llama.cpp context (and model copy) per stream, each in its
own thread with `--threads` threads (llama-cpp-python has no continuous batching across contexts);
tokens/s counts the tokens after each stream's first, from the moment every stream has its first
token to the last token (the definition `benchmarks/llm.py` uses for exitserve's streams).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

from peer_timing import Timed, many_streams, one_stream, timed

FILE_TYPES = {"q8_0": 7, "f16": 1, "q4_1": 3}  # llama_ftype values


def load(path: str, threads: int):
    from llama_cpp import Llama

    return Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=512,
                 verbose=False, logits_all=False)


def greedy(llm, prompt: list[int], new_tokens: int) -> Timed:
    return timed(llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True), new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf")
    parser.add_argument("--prompts", help="JSON file: a list of token-id lists")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="threads per stream")
    parser.add_argument("--quantize", help="requantise this GGUF (with --to, --out) and exit")
    parser.add_argument("--to", choices=sorted(FILE_TYPES))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.quantize:
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FILE_TYPES[args.to]
        params.allow_requantize = True
        params.nthread = 2
        with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # a line per tensor otherwise
            status = llama_cpp.llama_model_quantize(args.quantize.encode(), args.out.encode(), params)
        print(json.dumps({"quantized": args.out, "type": args.to, "status": int(status)}))
        return
    with open(args.prompts) as handle:
        prompts = json.load(handle)
    if args.streams == 1:
        out = one_stream(load(args.gguf, args.threads), greedy, prompts, args.new_tokens)
    else:  # one context (and model copy) per stream: llama-cpp-python batches nothing across contexts
        models = [load(args.gguf, args.threads) for _ in range(args.streams)]
        out = many_streams(models, greedy, prompts, args.new_tokens)
    import llama_cpp

    out["llama_cpp_python"] = llama_cpp.__version__
    print(json.dumps(out))


if __name__ == "__main__":
    main()
