"""`exitserve info`: verify a bundle and print its summary."""

from __future__ import annotations

import argparse

from exitserve.service.cli.flags import add_parser
from exitserve.service.settings import DEFAULT_BUNDLE


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
    # A small model (the digits example: ~0.1 MFLOPs) would read 0.00 in MFLOPs: count it in kFLOPs.
    unit, scale = ("MFLOPs", 1e6) if m.exits[-1].cumulative_flops >= 1e6 else ("kFLOPs", 1e3)
    print(f"exit  segment file          {unit}  cumulative  fraction")
    for e, s, frac in zip(m.exits, m.segments, m.compute_fractions(), strict=True):
        print(f"{e.index:4d}  {s.file:20s} {s.flops / scale:7.2f}  {e.cumulative_flops / scale:10.2f}  {frac:8.3f}")
    if bundle.calibration:
        cal = bundle.calibration
        print(f"calibration: {cal.get('validation_size', '?')} validation samples, "
              f"measure {cal.get('confidence', '?')}, data {cal.get('data_fingerprint', '?')}")
    else:
        print("calibration: none (run `exitserve calibrate`)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "info", "verify a bundle and print its summary")
    p.add_argument("bundle", nargs="?", default=str(DEFAULT_BUNDLE), help="bundle directory")
    p.set_defaults(func=_cmd_info)
