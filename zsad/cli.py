"""The ``zsad`` command (also ``python -m zsad``): data preparation, synthetic data, evaluation, reports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare datasets (meta.json) or generate SynthAD")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    from zsad.data.prepare import FORMATS

    prep = data_sub.add_parser("prepare", help="write meta.json for a dataset in its original layout")
    prep.add_argument("--format", required=True, choices=sorted(FORMATS))
    prep.add_argument(
        "--src", required=True, type=Path, help="dataset root (never modified, except meta.json)"
    )
    prep.add_argument("--out", type=Path, default=None, help="meta.json path (default: SRC/meta.json)")
    prep.add_argument("--skip-bad", action="store_true", help="warn about and skip unreadable files")

    synth = data_sub.add_parser(
        "synth", help="generate SynthAD, the embedded synthetic dataset (MVTec layout)"
    )
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--categories", default=None, help="comma-separated (default: all)")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate a method on a meta.json dataset, per class")
    ev.add_argument("--method", required=True, help="method ID, e.g. clip, winclip, clipad-sdp")
    ev.add_argument("--data", required=True, type=Path, help="dataset root containing meta.json")
    ev.add_argument("--meta", type=Path, default=None, help="a meta.json outside DATA (read-only datasets)")
    ev.add_argument(
        "--backbone", default=None, help="open_clip model name or zsad-tiny (default: the paper's)"
    )
    ev.add_argument("--weights", default=None, help="open_clip pretrained tag or a local weights file")
    ev.add_argument("--image-size", type=int, default=None)
    ev.add_argument(
        "--out", type=Path, default=None, help="write metrics.csv, metrics.md, scores.csv, run.json"
    )
    ev.add_argument("--k-shot", type=int, default=0, help="few-shot references per class from train/good")
    ev.add_argument("--seed", type=int, default=0, help="seed for drawing the few-shot references")
    ev.add_argument("--classes", default=None, help="comma-separated subset of classes")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--aupro", default="cflow", choices=["cflow", "exact"], help="AUPRO convention")
    ev.add_argument("--cache", action="store_true", help="cache frozen features on disk (ZSAD_CACHE)")
    ev.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "bf16"],
        help="fp32 (default, parity with the official code) or bf16 autocast of the image tower",
    )
    ev.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a `zsad train` output folder; backbone, weights, size and options come from its config.json",
    )


def _add_train(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser(
        "train", help="train a method's learned parts on the TEST split of an auxiliary dataset"
    )
    tr.add_argument("--method", required=True, help="a method with learned parts, e.g. aprilgan")
    tr.add_argument("--aux", required=True, type=Path, help="auxiliary dataset root (meta.json, with masks)")
    tr.add_argument("--out", required=True, type=Path, help="checkpoint folder")
    tr.add_argument("--meta", type=Path, default=None, help="a meta.json outside AUX")
    tr.add_argument("--classes", default=None, help="comma-separated subset of the auxiliary classes")
    tr.add_argument(
        "--backbone", default=None, help="open_clip model name or zsad-tiny (default: the paper's)"
    )
    tr.add_argument("--weights", default=None, help="open_clip pretrained tag or a local weights file")
    tr.add_argument("--image-size", type=int, default=None)
    tr.add_argument("--preset", default=None, help="named training preset, e.g. aux-mvtec / aux-visa")
    tr.add_argument("--epochs", type=int, default=None)
    tr.add_argument("--seed", type=int, default=None)
    tr.add_argument("--batch-size", type=int, default=None)
    tr.add_argument("--lr", type=float, default=None)
    tr.add_argument("--mosaic", type=float, default=None, help="mosaic probability (APRIL-GAN: 0.2 on MVTec)")
    tr.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT")
    tr.add_argument("--overwrite", action="store_true", help="start afresh over a checkpoint in OUT")
    tr.add_argument("--cache", type=Path, default=None, help="feature cache folder (default: ZSAD_CACHE)")
    tr.add_argument(
        "-o",
        "--option",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="method option (JSON literals parsed), e.g. -o layers [6,12,18,24]",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zsad", description="CLIP-based zero-shot anomaly detection")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    _add_eval(sub)
    _add_train(sub)
    sub.add_parser("methods", help="list the method IDs")
    rep = sub.add_parser("report", help="execute a notebook with papermill into a report folder (+ HTML)")
    rep.add_argument("notebook", type=Path)
    rep.add_argument("--out", required=True, type=Path, help="report folder, e.g. reports/quickstart")
    rep.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="notebook parameter (JSON literals are parsed: 518, null, true)",
    )
    return parser


def _run_data(args: argparse.Namespace) -> int:
    if args.data_command == "prepare":
        from zsad.data.prepare import prepare_dataset

        path = prepare_dataset(args.format, args.src, args.out, skip_bad=args.skip_bad)
        print(f"wrote {path}")
    else:
        from zsad.data.synth import generate

        categories = args.categories.split(",") if args.categories else None
        path = generate(args.out, seed=args.seed, categories=categories, progress=True)
        print(f"wrote SynthAD to {path}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from zsad import methods
    from zsad.data import load_dataset
    from zsad.evaluate import evaluate, fit_few_shot

    options = {"precision": args.precision} if args.precision else {}
    if args.checkpoint is not None:
        from zsad.train import load_checkpoint

        detector = load_checkpoint(
            args.checkpoint, args.method, args.backbone, args.weights, args.image_size, **options
        )
    else:
        detector = methods.create(
            args.method, backbone=args.backbone, weights=args.weights, image_size=args.image_size, **options
        )
        if getattr(detector, "learned", None) is not None:
            print(
                f"zsad: warning: {args.method} has learned parts and no --checkpoint was given; "
                "evaluating its untrained initialisation",
                file=sys.stderr,
            )
    classes = args.classes.split(",") if args.classes else None
    test = load_dataset(
        args.data, split="test", image_size=detector.image_size, classes=classes, meta=args.meta
    )
    extra: dict = {"data": str(args.data), "method": args.method}
    if args.checkpoint is not None:
        extra["checkpoint"] = str(args.checkpoint)
    if args.k_shot:
        if not detector.few_shot:
            raise SystemExit(
                f"zsad eval: {args.method} is zero-shot; drop --k-shot or pick a few-shot method"
            )
        train = load_dataset(
            args.data, split="train", image_size=detector.image_size, classes=classes, meta=args.meta
        )
        extra["k_shot"], extra["seed"] = args.k_shot, args.seed
        extra["references"] = fit_few_shot(detector, train, args.k_shot, seed=args.seed, classes=test.classes)
    result = evaluate(
        detector, test, batch_size=args.batch_size, aupro_convention=args.aupro, cache=args.cache
    )
    print(result.to_markdown())
    if args.out:
        print(f"wrote {result.save(args.out, extra)}")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from zsad.report import parse_value
    from zsad.train import train

    options = {name: parse_value(value) for name, value in args.option}
    out = train(
        args.method,
        args.aux,
        args.out,
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        mosaic=args.mosaic,
        preset=args.preset,
        classes=args.classes.split(",") if args.classes else None,
        meta=args.meta,
        resume=args.resume,
        overwrite=args.overwrite,
        cache=args.cache,
        **options,
    )
    print(f"wrote checkpoint {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from zsad.backbone import BackboneError

    try:
        if args.command == "data":
            return _run_data(args)
        if args.command == "eval":
            return _run_eval(args)
        if args.command == "train":
            return _run_train(args)
        if args.command == "report":
            from zsad.report import parse_value, render_notebook

            params = {name: parse_value(value) for name, value in args.parameter}
            print(f"wrote {render_notebook(args.notebook, args.out, params)}")
            return 0
        from zsad.methods import available

        print("\n".join(available()))
        return 0
    except (ValueError, FileNotFoundError, FileExistsError, BackboneError) as err:
        # User mistakes (bad paths, unknown names, missing weights) end with one readable line, no traceback.
        print(f"zsad: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
