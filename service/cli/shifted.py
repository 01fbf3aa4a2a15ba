"""`exitserve shifted-sets`: build the shifted and foreign CIFAR-10 test sets of issue 26 into a
folder (`exitserve evaluate BUNDLE --shifted DIR` reports on them)."""

from __future__ import annotations

import argparse

from exitserve.service.cli.errors import UserError
from exitserve.service.cli.flags import add_parser


def _cmd_shifted_sets(args: argparse.Namespace) -> int:
    from exitserve.models.shifted import CORRUPTIONS, FOREIGN, SEVERITIES, build_sets, save_sets

    if args.size < 1:
        raise UserError(f"--size must be at least 1, got {args.size}")
    families = CORRUPTIONS if args.corruptions is None else args.corruptions
    foreign = FOREIGN if args.foreign is None else args.foreign
    for name in families:
        if name not in CORRUPTIONS:
            raise UserError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    severities = args.severities or SEVERITIES
    if any(s not in SEVERITIES for s in severities):
        raise UserError(f"severities go from 1 to 5, got {' '.join(map(str, severities))}")
    rows = save_sets(build_sets(args.size, args.seed, families=families, severities=severities, foreign=foreign),
                     args.out, seed=args.seed)
    print(f"wrote {len(rows)} sets of up to {args.size} images to {args.out} (seed {args.seed}): "
          + ", ".join(r["name"] for r in rows))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "shifted-sets", "build shifted and foreign CIFAR-10 test sets (corruptions at 5 severities, "
                                        "noise, constant and gradient images, MNIST digits) for evaluate --shifted")
    p.add_argument("--out", required=True, help="directory for one .npz per set and sets.json")
    p.add_argument("--size", type=int, default=2000,
                   help="images per set (the corruptions use a seeded subset of the 10,000 CIFAR-10 test images)")
    p.add_argument("--seed", type=int, default=0, help="the same seed and size give the same bytes")
    p.add_argument("--corruptions", nargs="*", metavar="NAME",
                   help="corruption families (default all: gaussian-noise defocus-blur jpeg contrast brightness pixelate); "
                        "none given: no CIFAR-10 sets")
    p.add_argument("--severities", nargs="+", type=int, metavar="S", help="severities 1..5 (default all)")
    p.add_argument("--foreign", nargs="*", metavar="NAME",
                   help="foreign sets (default all: uniform-noise gaussian-images constant gradient mnist)")
    p.set_defaults(func=_cmd_shifted_sets)
