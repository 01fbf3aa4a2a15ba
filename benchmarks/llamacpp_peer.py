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
import statistics
import threading
import time

FILE_TYPES = {"q8_0": 7, "f16": 1, "q4_1": 3}  # llama_ftype values


def load(path: str, threads: int):
    from llama_cpp import Llama

    return Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=512,
                 verbose=False, logits_all=False)


def greedy(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float, float]:
    """(tokens, time of the first token, time of the last, decoding tokens/s after the first)."""
    tokens, first_at = [], 0.0
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        now = time.perf_counter()
        if not tokens:
            first_at = now
        tokens.append(int(token))
        if len(tokens) >= new_tokens:
            break
    end = time.perf_counter()
    rate = (len(tokens) - 1) / (end - first_at) if len(tokens) > 1 and end > first_at else 0.0
    return tokens, first_at, end, rate


def one_stream(path: str, prompts: list[list[int]], new_tokens: int, threads: int) -> dict:
    llm = load(path, threads)
    greedy(llm, prompts[0], 4)  # warm
    rates, outputs = [], []
    for prompt in prompts:
        tokens, _, _, rate = greedy(llm, prompt, new_tokens)
        rates.append(rate)
        outputs.append(tokens)
    return {"streams": 1, "prompts": len(prompts), "tokens_per_s_median": statistics.median(rates),
            "rates": rates, "outputs": outputs}


def many_streams(path: str, prompts: list[list[int]], new_tokens: int, streams: int, threads: int) -> dict:
    models = [load(path, threads) for _ in range(streams)]
    for llm in models:
        greedy(llm, prompts[0], 2)
    results: list[tuple[list[int], float, float, float] | None] = [None] * streams

    def run(i: int) -> None:
        results[i] = greedy(models[i], prompts[i % len(prompts)], new_tokens)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done = [r for r in results if r is not None]
    start, end = max(r[1] for r in done), max(r[2] for r in done)
    tokens = sum(len(r[0]) - 1 for r in done)
    return {"streams": streams, "tokens_per_s": tokens / (end - start)}


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
        out = one_stream(args.gguf, prompts, args.new_tokens, args.threads)
    else:
        out = many_streams(args.gguf, prompts, args.new_tokens, args.streams, args.threads)
    import llama_cpp

    out["llama_cpp_python"] = llama_cpp.__version__
    print(json.dumps(out))


if __name__ == "__main__":
    main()
