"""The ``zsad`` command (also ``python -m zsad``): data preparation, synthetic data, evaluation, reports."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from pathlib import Path

# `zsad train --resume` takes every setting from the interrupted run; only these flags may differ from it.
RESUME_FREE_FLAGS = (
    "--cache",
    "--device",
    "--workers",
    "--features-on-device",
    "--epochs (upward: train on)",
)
MISSING_MASKS = ("exclude", "zero-fill")


def _size(text: str) -> int:
    """An image size in pixels: a positive integer (0 or a negative size is a typo, not "the default")."""
    value = _positive(text)
    if not 16 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"image size must be between 16 and 4096 pixels; got {value}")
    return value


def _whole_number_at_least(minimum: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number; got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}; got {value}")
    return value


def _positive(text: str) -> int:
    return _whole_number_at_least(1, text)


def _non_negative(text: str) -> int:
    return _whole_number_at_least(0, text)


def _class_list(text: str) -> list[str]:
    """``"wood, pill"`` -> ["wood", "pill"]: spaces around names are shell quoting, not part of the name."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"an empty class name in {text!r}; write e.g. wood,pill")
    return names


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
    prep.add_argument(
        "--skip-bad", action="store_true", help="decode every file; warn about and skip unreadable ones"
    )
    prep.add_argument(
        "--overwrite", action="store_true", help="replace an existing meta.json (kept as meta.json.bak)"
    )

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
    ev.add_argument("--image-size", type=_size, default=None)
    ev.add_argument(
        "--out", type=Path, default=None, help="write metrics.csv, metrics.md, scores.csv, run.json"
    )
    ev.add_argument(
        "--k-shot", type=_non_negative, default=0, help="few-shot references per class from train/good"
    )
    ev.add_argument("--seed", type=int, default=0, help="seed for drawing the few-shot references")
    ev.add_argument("--classes", type=_class_list, default=None, help="comma-separated subset of classes")
    ev.add_argument("--batch-size", type=_positive, default=8)
    ev.add_argument(
        "--skip-bad", action="store_true", help="warn about and skip unreadable images (as in `data prepare`)"
    )
    ev.add_argument(
        "--missing-masks",
        choices=MISSING_MASKS,
        default="exclude",
        help="anomalous test images without a mask_path: exclude (default) leaves them out of the pixel "
        "metrics with a warning; zero-fill scores them against an all-zero mask like the official loaders "
        "(needed to reproduce published pixel numbers on such datasets)",
    )
    ev.add_argument("--aupro", default="cflow", choices=["cflow", "exact"], help="AUPRO convention")
    ev.add_argument("--cache", action="store_true", help="cache frozen features on disk (ZSAD_CACHE)")
    _add_device_options(ev)
    ev.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a `zsad train` output folder; backbone, weights, size and options come from its config.json",
    )
    _add_deploy_options(ev)
    ev.add_argument(
        "--save-maps",
        type=Path,
        default=None,
        help="write per test image its full-resolution map (.npy), overlay and, with thresholds, mask (.png)",
    )


def _add_method_option_flag(parser: argparse.ArgumentParser, example: str) -> None:
    """``-o NAME VALUE`` (repeatable): a method option, its value read as a JSON literal where it parses."""
    parser.add_argument(
        "-o",
        "--option",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help=f"method option (JSON literals parsed), e.g. -o {example}",
    )


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    """Where a run executes (docs/gpu.md): device, precision and the DataLoader workers that load its
    images."""
    from zsad.device import default_workers

    parser.add_argument(
        "--device",
        default="auto",
        help="auto (default: the first CUDA device if there is one, else the CPU), cpu, cuda or cuda:N",
    )
    parser.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "bf16", "fp16"],
        help="fp32 (default, parity with the official code), bf16 autocast of the image tower, or fp16 "
        "(CUDA only)",
    )
    parser.add_argument(
        "--workers",
        type=_non_negative,
        default=default_workers(),
        help=f"DataLoader processes decoding and resizing images (default here: {default_workers()})",
    )


def _add_deploy_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by eval and predict: an official checkpoint and thresholds (issue 18)."""
    parser.add_argument(
        "--official", type=Path, default=None, help="a released checkpoint file, read by from_official"
    )
    parser.add_argument(
        "--thresholds",
        type=Path,
        default=None,
        help="a `zsad calibrate` thresholds.json (default: the --checkpoint folder's own, if any)",
    )


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    cal = sub.add_parser(
        "calibrate", help="per-class thresholds (normal-only quantile or validation F1-max): thresholds.json"
    )
    cal.add_argument("--method", required=True, help="method ID")
    cal.add_argument("--data", required=True, type=Path, help="calibration dataset root (meta.json)")
    cal.add_argument("--out", required=True, type=Path, help="folder for thresholds.json (e.g. a checkpoint)")
    cal.add_argument("--meta", type=Path, default=None, help="a meta.json outside DATA")
    cal.add_argument(
        "--normal-only",
        action="store_true",
        help="quantile of normal images' scores and pixels (default split: train) instead of F1-max on a "
        "labelled validation set (default split: test of a dataset that is NOT the evaluated one)",
    )
    cal.add_argument("--quantile", type=float, default=0.99, help="normal-only quantile (default 0.99)")
    cal.add_argument("--split", default=None, choices=("train", "test"), help="split to calibrate on")
    cal.add_argument("--classes", type=_class_list, default=None, help="comma-separated subset of classes")
    cal.add_argument("--checkpoint", type=Path, default=None, help="a `zsad train` output folder")
    cal.add_argument("--backbone", default=None, help="open_clip model name or zsad-tiny")
    cal.add_argument("--weights", default=None, help="open_clip pretrained tag or a local weights file")
    cal.add_argument("--image-size", type=_size, default=None)
    cal.add_argument(
        "--k-shot", type=_non_negative, default=0, help="few-shot references per class from train/good"
    )
    cal.add_argument("--seed", type=int, default=0, help="seed for drawing the few-shot references")
    cal.add_argument("--batch-size", type=_positive, default=8)
    _add_device_options(cal)
    cal.add_argument(
        "--official", type=Path, default=None, help="a released checkpoint file, read by from_official"
    )


def _add_export(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="export a detector for one class to ONNX (run it with predict --onnx)")
    ex.add_argument("--method", required=True, help="method ID")
    ex.add_argument("--class-name", required=True, help="the class whose text embeddings are frozen in")
    ex.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    ex.add_argument("--checkpoint", type=Path, default=None, help="a `zsad train` output folder")
    ex.add_argument(
        "--official", type=Path, default=None, help="a released checkpoint file, read by from_official"
    )
    ex.add_argument("--backbone", default=None, help="open_clip model name or zsad-tiny")
    ex.add_argument("--weights", default=None, help="open_clip pretrained tag or a local weights file")
    ex.add_argument("--image-size", type=_size, default=None)
    ex.add_argument("--reference", nargs="+", default=None, help="few-shot normal images (files or folders)")
    _add_method_option_flag(ex, example="hsf off")


def _add_train(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser(
        "train",
        help="train a method's learned parts on the TEST split of an auxiliary dataset (or fine-tune on a "
        "target's labelled train split: --split train --init-from CKPT)",
        epilog="--resume takes every setting from the interrupted run: any other flag must equal the stored "
        f"value or the command stops naming both. Free with --resume: {', '.join(RESUME_FREE_FLAGS)}. "
        "Long CPU runs: start Python with MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_TRIM_THRESHOLD_=1048576 "
        "MALLOC_ARENA_MAX=2 (the Makefile does) or glibc's allocator grows memory epoch after epoch.",
    )
    tr.add_argument("--method", required=True, help="a method with learned parts, e.g. aprilgan")
    tr.add_argument("--aux", required=True, type=Path, help="auxiliary dataset root (meta.json, with masks)")
    tr.add_argument("--out", required=True, type=Path, help="checkpoint folder")
    tr.add_argument("--meta", type=Path, default=None, help="a meta.json outside AUX")
    tr.add_argument(
        "--classes", type=_class_list, default=None, help="comma-separated subset of the auxiliary classes"
    )
    tr.add_argument(
        "--split", choices=("test", "train"), default=None, help="split to train on (default: test)"
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
    tr.add_argument("--image-size", type=_size, default=None)
    tr.add_argument("--preset", default=None, help="named training preset, e.g. aux-mvtec / aux-visa")
    tr.add_argument("--epochs", type=_positive, default=None)
    tr.add_argument("--seed", type=int, default=None)
    tr.add_argument("--batch-size", type=_positive, default=None)
    tr.add_argument("--lr", type=float, default=None)
    tr.add_argument("--mosaic", type=float, default=None, help="mosaic probability (APRIL-GAN: 0.2 on MVTec)")
    tr.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT")
    tr.add_argument("--overwrite", action="store_true", help="start afresh over a checkpoint in OUT")
    tr.add_argument("--cache", type=Path, default=None, help="feature cache folder (default: ZSAD_CACHE)")
    _add_device_options(tr)
    tr.add_argument(
        "--features-on-device",
        action="store_true",
        help="keep the cached frozen features on the device after their first read (when they fit)",
    )
    _add_method_option_flag(tr, example="layers [6,12,18,24]")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser(
        "predict", help="score single images: a CSV of scores and a heatmap overlay per image"
    )
    pr.add_argument("images", nargs="+", type=Path, help="image files")
    pr.add_argument(
        "--method", default=None, help="method ID (zero-shot, or trained with --checkpoint); not with --onnx"
    )
    pr.add_argument(
        "--out", required=True, type=Path, help="folder for scores.csv, *_map.npy, *_mask.png, *_overlay.png"
    )
    pr.add_argument(
        "--backbone", default=None, help="open_clip model name or zsad-tiny (default: the paper's)"
    )
    pr.add_argument("--weights", default=None, help="open_clip pretrained tag or a local weights file")
    pr.add_argument("--image-size", type=_size, default=None)
    pr.add_argument("--checkpoint", type=Path, default=None, help="a `zsad train` output folder")
    pr.add_argument(
        "--class-name",
        default=None,
        help='the object named in the prompts (default "object"; with --onnx, the exported class)',
    )
    pr.add_argument("--batch-size", type=_positive, default=8)
    _add_device_options(pr)
    _add_deploy_options(pr)
    pr.add_argument(
        "--reference", nargs="+", default=None, help="few-shot methods: k normal images (files or folders)"
    )
    pr.add_argument("--onnx", type=Path, default=None, help="run a `zsad export` graph with ONNX Runtime")


def _render_one(args: argparse.Namespace) -> int:
    """``zsad report NOTEBOOK``: the plan rules for one notebook (parameters checked against its
    ``parameters`` cell before it runs; on failure the partial notebook and ``error.txt`` stay in OUT)."""
    from zsad.outputs import writable_dir
    from zsad.plans import INJECTED, check_parameters, notebook_parameters
    from zsad.report import parse_value, render_notebook
    from zsad.runs import ERROR_FILE, _error_text, _first_line

    notebook = Path(args.notebook).expanduser()
    if not notebook.is_file():
        raise FileNotFoundError(f"no notebook at {notebook}")
    params = {name: parse_value(value) for name, value in args.parameter}
    known = notebook_parameters(notebook)
    problems = [
        f"-p {name}: not in the parameters cell of {notebook.name} "
        f"(it has: {', '.join(k for k in known if k not in INJECTED)})"
        for name in params
        if name not in known or name in INJECTED
    ]
    problems += check_parameters(params, f"{notebook.name}")
    if problems:
        raise ValueError("\n".join(problems))
    out = writable_dir(args.out, "--out")
    (out / ERROR_FILE).unlink(missing_ok=True)  # a failure of an earlier render is no longer current
    try:
        html = render_notebook(notebook, out, params)
    except Exception as err:
        out.mkdir(parents=True, exist_ok=True)
        (out / ERROR_FILE).write_text(_error_text(err), encoding="utf-8")
        print(
            f"zsad: error: {notebook.name} failed: {_first_line(err)} (partial notebook and details: "
            f"{out / notebook.name}, {out / ERROR_FILE})",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {html}")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from zsad.plans import is_plan_file

    if not is_plan_file(args.notebook):
        if args.out is None:
            raise ValueError("zsad report NOTEBOOK needs --out DIR (the report folder)")
        if args.only or args.force or args.jobs != 1 or args.executor != "local" or args.address:
            raise ValueError(
                "--only/--force/--jobs/--executor/--address are for plans (.yaml), not notebooks"
            )
        return _render_one(args)
    if args.parameter:
        raise ValueError("-p is for a single notebook; a plan sets parameters per run in its YAML")
    from zsad.outputs import writable_dir
    from zsad.plans import format_results, load_plan, run_plan

    plan = load_plan(args.notebook)
    reports = writable_dir(args.out or Path("reports"), "--out")
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
    _add_calibrate(sub)
    _add_export(sub)
    return parser


def _run_data(args: argparse.Namespace) -> int:
    if args.data_command == "prepare":
        from zsad.data.prepare import prepare_dataset

        path = prepare_dataset(
            args.format,
            _dataset_folder(args.src, "--src"),
            args.out,
            skip_bad=args.skip_bad,
            overwrite=args.overwrite,
        )
        print(f"wrote {path}")
    else:
        from zsad.data.synth import generate

        categories = args.categories.split(",") if args.categories else None
        path = generate(args.out, seed=args.seed, categories=categories, progress=True)
        print(f"wrote SynthAD to {path}")
    return 0


def _dataset_folder(path: Path, flag: str) -> Path:
    """``--data``/``--aux`` name a dataset folder; a meta.json given there gets told apart from a typo."""
    from zsad.outputs import expand

    path = expand(path)
    if path.is_file():
        raise ValueError(
            f"{flag} {path} is a file; pass its folder ({flag} {path.parent}), or --meta FILE for a "
            "meta.json kept outside the dataset"
        )
    return path


def _check_outputs(args: argparse.Namespace, cache: bool) -> None:
    """Expand ``~`` in ``--out`` and check it (and the feature cache, when used) is writable, so a bad path
    stops the command before any model loads instead of after the compute."""
    from zsad.cache import default_cache_dir, zsad_home
    from zsad.outputs import writable_dir

    if getattr(args, "out", None) is not None:
        args.out = writable_dir(args.out, "--out")
    if getattr(args, "save_maps", None) is not None:
        args.save_maps = writable_dir(args.save_maps, "--save-maps")
    if not cache:
        return
    if isinstance(getattr(args, "cache", None), Path):
        args.cache = writable_dir(args.cache, "--cache")
    elif "ZSAD_CACHE" in os.environ:
        writable_dir(default_cache_dir(), "ZSAD_CACHE")
    else:
        writable_dir(zsad_home(), "ZSAD_HOME")


def _run_eval(args: argparse.Namespace) -> int:
    from zsad import methods
    from zsad.data import load_dataset
    from zsad.evaluate import evaluate, fit_few_shot

    device = _run_device(args)
    args.data = _dataset_folder(args.data, "--data")
    _check_outputs(args, cache=args.cache)
    from zsad.predict import resolve_thresholds

    thresholds = resolve_thresholds(args.thresholds, args.checkpoint)  # a bad file fails before any load
    options = {"precision": args.precision} if args.precision else {}
    if args.official is not None:
        from zsad.predict import detector_from_args

        detector = detector_from_args(args, device)
    elif args.checkpoint is not None:
        from zsad.train import load_checkpoint

        detector = load_checkpoint(
            args.checkpoint, args.method, args.backbone, args.weights, args.image_size, device, **options
        )
    else:
        detector = methods.create(
            args.method,
            backbone=args.backbone,
            weights=args.weights,
            image_size=args.image_size,
            device=device,
            **options,
        )
        if getattr(detector, "learned", None) is not None:
            print(
                f"zsad: warning: {args.method} has learned parts and no --checkpoint was given; "
                "evaluating its untrained initialisation",
                file=sys.stderr,
            )
    if not args.k_shot and getattr(detector, "memory", None) is not None:
        raise ValueError(
            f"{args.method} scores test images against k normal reference images per class: pass --k-shot K "
            "(K >= 1), or pick its zero-shot counterpart"
        )
    classes = args.classes
    test = load_dataset(
        args.data,
        split="test",
        image_size=detector.image_size,
        classes=classes,
        meta=args.meta,
        skip_bad=args.skip_bad,
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
    from zsad.predict import PerImageScores, confusion_line, decide_scores, save_eval_maps

    if args.official is not None:
        extra["official"] = str(args.official)
    if thresholds is not None:
        thresholds.check_detector(detector.config(), thresholds.source)
        extra["thresholds"] = thresholds.source
    with PerImageScores(detector) as per_image:
        result = evaluate(
            detector,
            test,
            batch_size=args.batch_size,
            aupro_convention=args.aupro,
            cache=args.cache,
            keep_maps=args.save_maps is not None,
            missing_masks=args.missing_masks,
            workers=args.workers,
        )
    print(result.to_markdown())
    if thresholds is not None:
        _warn_if_calibrated_on(thresholds, args.data, "test")
        result.scores = decide_scores(result.scores, thresholds, per_image.scores)
        print(confusion_line(result.scores))
    if args.save_maps is not None:
        print(f"wrote maps to {save_eval_maps(result.maps, test, args.save_maps, thresholds, result.scores)}")
    if args.out:
        print(f"wrote {result.save(args.out, extra)}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    """``zsad export``: build the detector as predict does (references for few-shot methods), export it."""
    from zsad.export import check_exportable, export_onnx
    from zsad.outputs import writable_dir
    from zsad.predict import detector_from_args, give_references
    from zsad.report import parse_value

    args.out = writable_dir(args.out.expanduser().parent, "--out") / args.out.name  # before any weights load
    options = {name: parse_value(value) for name, value in args.option}
    detector = detector_from_args(args, **options)
    check_exportable(detector)
    give_references(detector, args.reference, args.class_name)
    path = export_onnx(detector, args.class_name, args.out)
    print(f"wrote {path} ({detector.method_id}, class {args.class_name!r}, {detector.image_size} px)")
    return 0


def _run_device(args: argparse.Namespace):
    """The run's torch device from ``--device``/``--precision``, checked before anything loads: a device this
    machine lacks, or fp16 off CUDA, is one line naming what exists (exit 2)."""
    from zsad.device import prepare

    return prepare(args.device, args.precision or "fp32")


def _warn_if_calibrated_on(thresholds, data: Path, split: str) -> None:
    calibrated = thresholds.data
    if calibrated.get("split") == split and calibrated.get("root") == str(Path(data).resolve()):
        print(
            f"zsad: warning: the thresholds were calibrated on {data} ({split}), the set evaluated here: "
            "its labels are optimistic",
            file=sys.stderr,
        )


def _run_calibrate(args: argparse.Namespace) -> int:
    from zsad.data import load_dataset
    from zsad.evaluate import fit_few_shot
    from zsad.predict import detector_from_args
    from zsad.thresholds import calibrate, check_quantile

    check_quantile(args.quantile)
    device = _run_device(args)
    args.data = _dataset_folder(args.data, "--data")
    _check_outputs(args, cache=False)
    rule = "normal-quantile" if args.normal_only else "f1-max"
    split = args.split or ("train" if args.normal_only else "test")
    detector = detector_from_args(args, device)
    classes = args.classes
    data = load_dataset(
        args.data, split=split, image_size=detector.image_size, classes=classes, meta=args.meta
    )
    references: list[str] = []
    if args.k_shot:
        if not detector.few_shot:
            raise ValueError(f"{args.method} is zero-shot; drop --k-shot or pick a few-shot method")
        train = load_dataset(
            args.data, split="train", image_size=detector.image_size, classes=classes, meta=args.meta
        )
        references = fit_few_shot(detector, train, args.k_shot, seed=args.seed, classes=data.classes)
    elif getattr(detector, "memory", None) is not None:
        raise ValueError(f"{args.method} needs few-shot references: give --k-shot K")
    thresholds = calibrate(
        detector,
        data,
        rule,
        args.quantile,
        batch_size=args.batch_size,
        exclude=references,
        workers=args.workers,
    )
    thresholds.data = {
        "root": str(Path(args.data).resolve()),
        "meta": str(args.meta) if args.meta else None,
        "split": split,
        "classes": sorted(thresholds.classes),
        "references": references,
    }
    for key, value in (("checkpoint", args.checkpoint), ("official", args.official)):
        if value is not None:
            thresholds.detector[key] = str(value)
    path = thresholds.save(Path(args.out) / "thresholds.json")
    for name, entry in [*thresholds.classes.items(), ("global", thresholds.global_entry)]:
        pixel = f"{entry.pixel.threshold:.4f}" if entry.pixel else "n/a"
        print(f"{name}: {entry.rule}, image {entry.image.threshold:.4f}, pixel {pixel}, {entry.counts}")
    print(f"wrote {path}")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from zsad.report import parse_value

    device = _run_device(args)
    args.aux = _dataset_folder(args.aux, "--aux")
    _check_outputs(args, cache=True)
    from zsad.train import train

    options = {name: parse_value(value) for name, value in args.option}
    if args.precision:
        options["precision"] = args.precision
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
        classes=args.classes,
        meta=args.meta,
        split=args.split,
        init_from=args.init_from,
        resume=args.resume,
        overwrite=args.overwrite,
        cache=args.cache,
        device=device,
        workers=args.workers,
        features_on_device=args.features_on_device,
        **options,
    )
    print(f"wrote checkpoint {out}")
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings reach a CLI user as ``zsad: warning: ...``, without the library's source line."""
    print(f"zsad: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError

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
            _check_outputs(args, cache=False)
            from zsad.predict import run_predict

            return run_predict(args)
        if args.command == "calibrate":
            return _run_calibrate(args)
        if args.command == "export":
            return _run_export(args)
        from zsad.methods import available

        print("\n".join(available()))
        return 0
    except KeyboardInterrupt:
        _show_traceback()
        print(f"zsad: {_interrupted_line(args)}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, BackboneError) as err:
        # User mistakes (bad paths, unknown names, missing weights) end with one readable line, no traceback.
        _show_traceback()
        for line in str(err).splitlines() or [""]:  # a plan lists every problem, one line each
            print(f"zsad: error: {line}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as err:
        # The machine's problems (permissions, a full disk, a damaged file): the path and what to do.
        _show_traceback()
        print(f"zsad: error: {_environment_line(err)}", file=sys.stderr)
        return 1


def _show_traceback() -> None:
    """ZSAD_DEBUG=1 prints the traceback that the one-line message replaces."""
    if os.environ.get("ZSAD_DEBUG") == "1":
        import traceback

        traceback.print_exc()


_OS_ADVICE = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder where a file was expected",
    errno.ENOSPC: "the disk is full: free some space (or choose a path on another disk) and run again",
    errno.EDQUOT: "the disk quota is exhausted: free some space and run again",
}


def _environment_line(err: BaseException) -> str:
    if isinstance(err, OSError):
        where = err.filename or "a file"
        reason = err.strerror or type(err).__name__
        advice = _OS_ADVICE.get(err.errno, "")
        advice = f"; {advice}" if advice else ""
        return f"{where}: {reason}{advice} (ZSAD_DEBUG=1 shows the traceback)"
    return f"a safetensors file is damaged or not safetensors ({err}); ZSAD_DEBUG=1 shows which"


def _interrupted_line(args: argparse.Namespace) -> str:
    """What an interrupt left behind: for train, the epochs saved and the command that continues them."""
    if args.command != "train":
        return "interrupted (Ctrl-C) before the results were complete; run the command again"
    import json

    config = Path(args.out) / "config.json"
    try:
        done = int(json.loads(config.read_text()).get("epochs_done", 0))
    except (OSError, ValueError):
        done = 0
    if done == 0:
        return f"interrupted (Ctrl-C) before the first epoch was saved in {args.out}; run the command again"
    again = f"zsad train --method {args.method} --aux {args.aux} --out {args.out} --resume"
    return f"interrupted (Ctrl-C); {done} epoch(s) saved in {args.out}; continue with: {again}"


if __name__ == "__main__":
    raise SystemExit(main())
