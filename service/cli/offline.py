"""`exitserve calibrate` and `exitserve evaluate`: offline work on a bundle, with the headline figures
printed on the console (per-exit accuracy; promise and coverage of the default policy at a few δ)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exitserve.service.cli.errors import UserError
from exitserve.service.cli.flags import add_parser
from exitserve.service.settings import Settings

SUMMARY_DELTAS: tuple[float, ...] = (0.8, 0.9, 0.95, 0.99)
DEFAULT_POLICY: str = Settings.model_fields["default_policy"].default  # what a request without a policy gets


def print_summary(report: dict, policy: str = DEFAULT_POLICY, deltas: tuple[float, ...] = SUMMARY_DELTAS) -> None:
    """Per-exit accuracy, then `policy` at the chosen δ: accuracy of all answers, accuracy of the
    promised ones (target_met), their coverage and the mean compute, from an evaluation report."""
    print("exit  compute  accuracy")
    for e in report["exits"]:
        print(f"{e['index']:4d}  {e['compute_fraction']:7.3f}  {e['accuracy']:8.3f}")
    rows = {round(r["delta"], 6): r for r in report["policies"].get(policy, [])}
    chosen = [rows[round(d, 6)] for d in deltas if round(d, 6) in rows]
    if not chosen:
        return
    print(f"policy {policy} (exits count from 0; 'promised' = accuracy of the answers with target_met):")
    print("   δ   accuracy  promised  coverage  compute")
    for r in chosen:
        promised = "–" if r["accuracy_promised"] is None else f"{r['accuracy_promised']:.3f}"
        flag = "  below δ" if r["violation"] else ""
        print(f"{r['delta']:.2f}  {r['accuracy']:9.3f}  {promised:>8}  {r['coverage']:8.3f}  {r['compute_fraction']:7.3f}{flag}")


def _cmd_calibrate(args: argparse.Namespace) -> int:
    if args.from_feedback:
        return _calibrate_from_feedback(args)
    if args.merge or args.out or args.version:
        raise UserError("--merge, --out and --version go with --from-feedback")
    if not args.data:
        raise UserError("calibrate needs --data (held-out data) or --from-feedback LOG")
    from exitserve.calibration.evaluation import evaluate_policies
    from exitserve.models.bundle import load_bundle
    from exitserve.service.tools.offline import fit_bundle, input_guard_verdict

    fitted = fit_bundle(
        args.bundle, args.data, progress=not args.no_progress, confidence=args.confidence, bins=args.bins,
        binning=args.binning, window=args.window, alpha=args.alpha, fit_temperature=not args.no_temperature,
        input_guard=not args.no_input_guard, guard_quantile=args.guard_quantile,
    )
    print(f"wrote {Path(args.bundle) / 'calibration.json'} and re-signed the manifest")
    fractions = load_bundle(args.bundle).manifest.compute_fractions()
    report = evaluate_policies(fitted.calibration, fitted.logits, fitted.labels, fractions, SUMMARY_DELTAS,
                               policies=[DEFAULT_POLICY], over_promise_deltas=(),
                               in_distribution=input_guard_verdict(fitted.calibration, fitted.features))
    print(f"on the calibration data itself ({len(fitted.labels)} samples of {args.data}; optimistic: "
          "`exitserve evaluate` on test data gives the honest figures):")
    print_summary(report)
    return 0


def _calibrate_from_feedback(args: argparse.Namespace) -> int:
    from exitserve.service.tools.offline import _command_line
    from exitserve.service.tools.recalibrate import recalibrate_from_feedback, validation_spec

    if args.data and not args.merge:
        raise UserError("with --from-feedback, --data names the data to --merge with")
    merge = (args.data or validation_spec(args.bundle)) if args.merge else None
    done = recalibrate_from_feedback(args.bundle, args.from_feedback, out=args.out, version=args.version,
                                     merge_data=merge, command=_command_line(), progress=not args.no_progress)
    skipped = ", ".join(f"{n} {why}" for why, n in done.skipped.items())
    print(f"tables recounted from {done.feedback_samples} labelled samples"
          + (f" and {done.merged_samples} from {merge}" if merge else "")
          + f"; samples per exit {done.per_exit_samples}" + (f"; skipped {skipped}" if skipped else ""))
    print(f"wrote bundle version {done.version} to {done.out}; "
          f"hot-reload it with POST /admin/models/<model>/reload {{\"path\": \"{done.out}\"}}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.shifted:
        return _evaluate_shifted(args)
    if args.sets or args.policies:
        raise UserError("--sets and --policies go with --shifted")
    if not args.data:
        raise UserError("evaluate needs --data (labelled test data) or --shifted DIR (sets of `exitserve shifted-sets`)")
    from exitserve.service.tools.offline import (
        EVALUATION_JSON,
        EVALUATION_MD,
        PLOTS_EXTRA,
        evaluate_bundle,
        plots_available,
    )

    report = evaluate_bundle(args.bundle, args.data, args.out, progress=not args.no_progress)
    print(f"{report['source']['bundle']} on {args.data} ({report['n']} samples):")
    if warning := report["source"].get("warning"):
        print(f"warning: {warning}", file=sys.stderr)
    print_summary(report)
    written = f"{args.out}/{EVALUATION_JSON} and {EVALUATION_MD}"
    if plots_available():
        print(f"wrote {written} and plots")
    else:
        print(f"wrote {written}; no plots: matplotlib is not installed (pip install 'exitserve[{PLOTS_EXTRA}]' adds them)")
    return 0


def _evaluate_shifted(args: argparse.Namespace) -> int:
    from exitserve.calibration.rules import POLICIES
    from exitserve.calibration.sets import TABLE_DELTAS
    from exitserve.service.tools.shifted import SHIFTED_JSON, SHIFTED_MD, evaluate_shifted_dir

    if args.data:
        raise UserError("--data and --shifted are two different reports: give one")
    policies = args.policies or [DEFAULT_POLICY]
    for policy in policies:
        if policy not in POLICIES:
            raise UserError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    report = evaluate_shifted_dir(args.bundle, args.shifted, args.out, policies=policies, names=args.sets,
                                  progress=not args.no_progress)
    print(f"{report['source']['bundle']} on the sets in {args.shifted} (coverage / promised accuracy; "
          "foreign sets: coverage, all of it wrong):")
    for policy in policies:
        print(f"policy {policy}")
        print("set                   n     " + "  ".join(f"δ {d:.2f}        " for d in TABLE_DELTAS))
        for s in report["sets"]:
            rows = {round(r["delta"], 6): r for r in s["policies"][policy]}
            cells = []
            for d in TABLE_DELTAS:
                r = rows[round(d, 6)]
                promised = "–" if r["accuracy_promised"] is None or not s["labelled"] else f"{r['accuracy_promised']:.3f}"
                flag = "!" if s["labelled"] and r["violation"] else " "
                cells.append(f"{r['coverage']:.3f}/{promised:5}{flag}")
            print(f"{s['name']:20s} {s['n']:5d}  " + "  ".join(cells))
    print(f"wrote {args.out}/{SHIFTED_JSON} and {SHIFTED_MD} ('!': promised accuracy below δ)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "calibrate", "fit temperatures and reliability tables on held-out data")
    p.add_argument("bundle", help="bundle directory (calibration.json is written into it)")
    p.add_argument("--data", help="held-out data: cifar10:val, mnist:val, digits:val, sst2:val, agnews:val, "
                                  "or an .npz with arrays x (inputs) and y (class indices)")
    p.add_argument("--from-feedback", metavar="LOG",
                   help="recount the tables from a server's feedback log (EXITSERVE_FEEDBACK_LOG) into a new "
                        "bundle version; temperatures, bins and settings stay the bundle's")
    p.add_argument("--merge", action="store_true",
                   help="with --from-feedback: count validation data too (--data, default the bundle's own split)")
    p.add_argument("--out", help="with --from-feedback: directory of the new bundle (default BUNDLE-v<version>)")
    p.add_argument("--version", help="with --from-feedback: the new bundle's version (default: the next one)")
    p.add_argument("--confidence", default="max-softmax", choices=["max-softmax", "entropy", "margin"],
                   help="confidence measure of each exit")
    p.add_argument("--bins", type=int, default=15, help="confidence bins per exit")
    p.add_argument("--binning", default="equal-width", choices=["equal-width", "equal-mass"], help="bin edges")
    p.add_argument("--window", type=int, default=1, help="pcee-ws: smooth over +-H bins")
    p.add_argument("--alpha", type=float, default=0.05, help="pcee-lb: one-sided level of the lower bound")
    p.add_argument("--no-temperature", action="store_true", help="keep temperature 1 (no temperature scaling)")
    p.add_argument("--no-input-guard", action="store_true",
                   help="fit no input guard (the guard withholds the promise from inputs unlike this data; it "
                        "gives the first segment a features output, which needs onnx: the train extra)")
    p.add_argument("--guard-quantile", type=float, default=0.99,
                   help="input guard: the share of these samples it lets through (the rest sets its threshold)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_calibrate)

    p = add_parser(sub, "evaluate", "sweep delta for every policy on labelled test data: JSON, Markdown, plots")
    p.add_argument("bundle", help="calibrated bundle directory")
    p.add_argument("--data", help="test data: cifar10:test, mnist:test, digits:test, sst2:test, "
                                  "agnews:test, or an .npz with arrays x and y")
    p.add_argument("--shifted", metavar="DIR",
                   help="instead of --data: the sets of `exitserve shifted-sets` in DIR; writes shifted.json and "
                        "shifted.md (per set and δ: share promised, accuracy of the promised answers)")
    p.add_argument("--sets", nargs="+", metavar="NAME", help="with --shifted: only these sets (default all)")
    p.add_argument("--policies", nargs="+", metavar="POLICY",
                   help=f"with --shifted: policies to report (default {DEFAULT_POLICY}, what a request without one gets)")
    p.add_argument("--out", required=True, help="directory for evaluation.json, evaluation.md and the plots "
                                                "(with --shifted: shifted.json and shifted.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_evaluate)
