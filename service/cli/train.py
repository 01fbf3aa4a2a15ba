"""`exitserve train` and `exitserve train-text` (the `train` / `text` extras)."""

from __future__ import annotations

import argparse
from pathlib import Path

from exitserve.service.cli.export import export_checkpoint as _export
from exitserve.service.cli.flags import add_parser


def _cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import torch

    from exitserve.models.recipes import apply_recipe, run_training
    from exitserve.models.training import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(
        regime=args.regime, seed=args.seed, entropy_weight=args.entropy_weight,
        backbone_epochs=args.backbone_epochs, augment=not args.no_augment, bf16=args.bf16, device=args.device,
        distill_weight=args.distill_weight, distill_temperature=args.distill_temperature,
        gradient_equilibrium=args.gradient_equilibrium,
    )
    # a recipe sets its own batch size, learning rate and decay; flags given on the command line win
    given = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay}
    config = replace(apply_recipe(config, args.recipe), **{k: v for k, v in given.items() if v is not None})
    checkpoint = run_training(
        None if args.init else args.arch, args.data, Path(args.out), config,
        split_seed=args.split_seed, init=Path(args.init) if args.init else None, train_limit=args.train_limit,
        progress=not args.no_progress,
    )
    if args.export:
        return _export(checkpoint, Path(args.export), args.name, args.version, args.torchscript)
    return 0


def _cmd_train_text(args: argparse.Namespace) -> int:
    from exitserve.models.text_training import HeadTraining, train_text_command

    config = HeadTraining(epochs=args.epochs, lr=args.lr, entropy_weight=args.entropy_weight, seed=args.seed)
    train_text_command(args.data, args.heads, Path(args.export), name=args.name, layers=args.layers,
                       train_limit=args.train_limit, config=config, cache=Path(args.cache) if args.cache else None,
                       threads=args.threads, split_seed=args.split_seed, val_limit=args.val_limit)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "train", "train a multi-exit network (needs the `train` extra)")
    p.add_argument("--arch", default="resnet-large",
                   help="resnet-small, resnet-medium, resnet-large, resnet-deep, resnet-deep-late, resnet-deep-late-lean, "
                        "mnist-compact, digits-compact; cascade-large (a three-exit cascade, issue 27) and the "
                        "static networks of its family cascade-w16, -w32, -w48, -w64, -w64-256 (train with --recipe fast)")
    p.add_argument("--data", default="cifar10", help="cifar10, mnist or digits")
    p.add_argument("--regime", default="joint", choices=["joint", "mixed", "heads-only"],
                   help="joint: every exit on the labels; mixed: backbone first, then joint; "
                        "heads-only: frozen backbone, self-supervised exit heads")
    p.add_argument("--init", help="start from this checkpoint (required for heads-only)")
    p.add_argument("--epochs", type=int, help="epochs over the training split (default 30)")
    p.add_argument("--batch-size", type=int, help="samples per training step (default 256; the fast recipe: 1024)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.2; the fast recipe: 1.5)")
    p.add_argument("--weight-decay", type=float, help="SGD weight decay (default 5e-4; the fast recipe: 1.33e-3)")
    p.add_argument("--backbone-epochs", type=int, help="mixed: epochs of the backbone-only phase (default: half)")
    p.add_argument("--entropy-weight", type=float, default=0.1, help="heads-only: lambda in CE - lambda*entropy")
    p.add_argument("--distill-weight", type=float, default=0.0,
                   help="self-distillation: early exits learn (1-a) CE + a KL from the last exit (0 = off)")
    p.add_argument("--distill-temperature", type=float, default=3.0, help="self-distillation: softmax temperature")
    p.add_argument("--gradient-equilibrium", action="store_true", help="IMTA's gradient equilibrium between exits")
    p.add_argument("--recipe", choices=["plain", "sd", "ge", "sd-ge", "sd-mixed", "fast", "fast-sd"],
                   help="named recipe (models/recipes.py): sets --regime, --distill-weight, --gradient-equilibrium; "
                        "fast: airbench's recipe (label smoothing, whitened stem, lookahead, batch 1024); fast-sd: with self-distillation")
    p.add_argument("--train-limit", type=int, help="train on N random training samples only (timing, tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--no-augment", action="store_true", help="no random crops and flips (32x32 colour images)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast on AVX512-BF16 CPUs and GPUs)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="run directory for checkpoint.pt and history.json")
    p.add_argument("--export", help="also export a bundle to this directory")
    p.add_argument("--name", help="bundle name (default: the export directory's name)")
    p.add_argument("--version", default="1", help="bundle version")
    p.add_argument("--torchscript", action="store_true", help="also write TorchScript twins for the torch runner")
    p.set_defaults(func=_cmd_train)

    p = add_parser(sub, "train-text", "text classifier on the frozen MiniLM encoder with an exit per layer (`text` extra)")
    p.add_argument("--data", default="sst2", choices=["sst2", "agnews"], help="text data set")
    p.add_argument("--heads", default="self-supervised", choices=["self-supervised", "labels"],
                   help="exit heads learn the final exit's predictions (CE - lambda*entropy) or the true labels")
    p.add_argument("--layers", type=int, help="use only the first N encoder layers (default: all 6)")
    p.add_argument("--epochs", type=int, default=10, help="epochs over the cached encoder features, per head")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the heads")
    p.add_argument("--entropy-weight", type=float, default=0.1, help="self-supervised heads: lambda in CE - lambda*entropy")
    p.add_argument("--seed", type=int, default=0, help="seed of head initialisation and data order")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--train-limit", type=int, help="train on the first N training samples only (default: all)")
    p.add_argument("--val-limit", type=int, help="report validation accuracy on the first N held-out samples only (default: all)")
    p.add_argument("--cache", default="runs/cache/text-features", help="encoder features cache ('' for none)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--export", required=True, help="bundle directory to write")
    p.add_argument("--name", help="bundle name (default: the export directory's name)")
    p.set_defaults(func=_cmd_train_text)
