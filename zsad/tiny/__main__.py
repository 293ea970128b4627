"""``python -m zsad.tiny train|measure``: rebuild the embedded zsad-tiny weights, measure its card."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from zsad.tiny import CARD_FILE
from zsad.tiny.train import MALLOC_ENV, TrainConfig


def _ensure_malloc_env() -> None:
    """Re-exec once with the glibc settings that keep long CPU training flat in memory."""
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(
            sys.executable, [sys.executable, "-m", "zsad.tiny", *sys.argv[1:]], {**os.environ, **MALLOC_ENV}
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zsad.tiny", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train_p = sub.add_parser("train", help="train zsad-tiny from scratch on SynthAD (seeded)")
    defaults = TrainConfig()
    train_p.add_argument("--steps", type=int, default=defaults.steps)
    train_p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train_p.add_argument("--seed", type=int, default=defaults.seed)
    train_p.add_argument("--images-per-category", type=int, default=defaults.images_per_category)
    train_p.add_argument("--heldout", default=",".join(defaults.heldout), help="comma-separated categories")
    train_p.add_argument("--out", type=Path, default=None, help="output folder (default: inside the package)")
    measure_p = sub.add_parser(
        "measure", help="evaluate the baseline on SynthAD and write the numbers in the card"
    )
    measure_p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="SynthAD folder for the measurement (default: $ZSAD_HOME/synthad-measure)",
    )
    measure_p.add_argument("--weights", default=None, help="weights file (default: the shipped one)")
    measure_p.add_argument("--card", type=Path, default=CARD_FILE)
    args = parser.parse_args(argv)

    if args.command == "train":
        _ensure_malloc_env()
        from zsad.tiny.train import train

        cfg = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            images_per_category=args.images_per_category,
            heldout=tuple(c for c in args.heldout.split(",") if c),
        )
        card = train(cfg, args.out)
        print(
            json.dumps({k: card[k] for k in ("train_seconds", "final_loss", "heldout_categories")}, indent=2)
        )
    else:
        from zsad.cache import zsad_home
        from zsad.tiny.measure import measure

        args.data = args.data or zsad_home() / "synthad-measure"

        print(measure(args.data, args.card, args.weights).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
