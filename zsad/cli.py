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
        "train",
        help="train a method's learned parts on the TEST split of an auxiliary dataset (or fine-tune on a "
        "target's labelled train split: --split train --init-from CKPT)",
    )
    tr.add_argument("--method", required=True, help="a method with learned parts, e.g. aprilgan")
    tr.add_argument("--aux", required=True, type=Path, help="auxiliary dataset root (meta.json, with masks)")
    tr.add_argument("--out", required=True, type=Path, help="checkpoint folder")
    tr.add_argument("--meta", type=Path, default=None, help="a meta.json outside AUX")
    tr.add_argument("--classes", default=None, help="comma-separated subset of the auxiliary classes")
    tr.add_argument(
        "--split", choices=("test", "train"), default="test", help="split to train on (default: test)"
    )
    tr.add_argument(
        "--init-from",
        default=None,
        help="start from a checkpoint folder or an official checkpoint file (fine-tuning)",
    )
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


def _add_predict(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser(
        "predict", help="score single images: a CSV of scores and a heatmap overlay per image"
    )
    pr.add_argument("images", nargs="+", type=Path, help="image files")
    pr.add_argument("--method", required=True, help="method ID (zero-shot, or trained with --checkpoint)")
    pr.add_argument("--out", required=True, type=Path, help="folder for scores.csv and *_overlay.png")
    pr.add_argument(
        "--backbone", default=None, help="open_clip model name or zsad-tiny (default: the paper's)"
    )
    pr.add_argument("--weights", default=None, help="open_clip pretrained tag or a local weights file")
    pr.add_argument("--image-size", type=int, default=None)
    pr.add_argument("--checkpoint", type=Path, default=None, help="a `zsad train` output folder")
    pr.add_argument(
        "--class-name", default="object", help='the object named in the prompts (default "object")'
    )
    pr.add_argument("--batch-size", type=int, default=8)


def _run_report(args: argparse.Namespace) -> int:
    from zsad.plans import is_plan_file

    if not is_plan_file(args.notebook):
        if args.out is None:
            raise ValueError("zsad report NOTEBOOK needs --out DIR (the report folder)")
        if args.only or args.force or args.jobs != 1 or args.executor != "local" or args.address:
            raise ValueError(
                "--only/--force/--jobs/--executor/--address are for plans (.yaml), not notebooks"
            )
        from zsad.report import parse_value, render_notebook

        params = {name: parse_value(value) for name, value in args.parameter}
        print(f"wrote {render_notebook(args.notebook, args.out, params)}")
        return 0
    if args.parameter:
        raise ValueError("-p is for a single notebook; a plan sets parameters per run in its YAML")
    from zsad.plans import format_results, load_plan, run_plan

    plan = load_plan(args.notebook)
    reports = args.out or Path("reports")
    results, interrupted = run_plan(
        plan,
        reports,
        only=args.only,
        force=args.force,
        jobs=args.jobs,
        executor=args.executor,
        address=args.address,
    )
    print(format_results(results))
    print(f"summary: {reports / plan.name / 'summary.md'}; index: {reports / 'index.html'}")
    if interrupted:
        print("zsad: interrupted; finished runs are kept, rerun the same command to go on", file=sys.stderr)
        return 130
    return 1 if any(r.status == "failed" for r in results) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zsad", description="CLIP-based zero-shot anomaly detection")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    _add_eval(sub)
    _add_train(sub)
    sub.add_parser("methods", help="list the method IDs")
    rep = sub.add_parser(
        "report",
        help="execute a notebook, or a batch plan (YAML), with papermill into report folders (+ HTML)",
    )
    rep.add_argument("notebook", type=Path, help="a notebook (.ipynb) or a plan (.yaml, notebooks/plans/)")
    rep.add_argument(
        "--out",
        type=Path,
        default=None,
        help="notebook: the report folder (required), e.g. reports/quickstart; plan: the reports root "
        "(default: reports), runs land in OUT/<plan>/<run>/",
    )
    rep.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="notebook parameter (JSON literals are parsed: 518, null, true); not for plans",
    )
    rep.add_argument("--only", nargs="+", default=None, metavar="NAME", help="plan: run only these runs")
    rep.add_argument("--force", action="store_true", help="plan: re-execute runs that already finished")
    rep.add_argument("--jobs", type=int, default=1, help="plan, local executor: runs at a time (default 1)")
    rep.add_argument(
        "--executor",
        default="local",
        choices=["local", "ray"],
        help="plan: where runs execute (default local)",
    )
    rep.add_argument("--address", default=None, help="plan, ray executor: cluster address (default: local)")
    _add_predict(sub)
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
        split=args.split,
        init_from=args.init_from,
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
            return _run_report(args)
        if args.command == "predict":
            from zsad.predict import run_predict

            return run_predict(args)
        from zsad.methods import available

        print("\n".join(available()))
        return 0
    except (ValueError, FileNotFoundError, FileExistsError, BackboneError) as err:
        # User mistakes (bad paths, unknown names, missing weights) end with one readable line, no traceback.
        for line in str(err).splitlines() or [""]:  # a plan lists every problem, one line each
            print(f"zsad: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
