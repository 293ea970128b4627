"""Benchmark: WinCLIP throughput on this CPU and the vectorised harmonic aggregation (docs/methods.md §2.3).

Not a test. It times

- WinCLIP zero-shot ``predict`` (images/s) on zsad-tiny at 128 px (16x16 grid: 225 + 196 windows) and on
  ViT-B-16-plus-240 at 240 px (15x15 grid: 196 + 169 windows), both with random weights (only the shapes
  matter for speed), for each requested thread count; text features are computed before timing;
- the harmonic aggregation of :func:`zsad.methods.winclip.harmonic_aggregation` (one masked reduction over a
  windows x patches incidence matrix) against a per-patch Python loop in the style of anomalib's
  ``harmonic_aggregation`` (for every patch, find the windows that contain it, then n / sum 1/s), on the
  15x15 grid with the 2x2 and 3x3 windows; checks both agree (1e-6) and prints the speed ratio.

    python benchmarks/bench_winclip.py [--batch 4] [--repeats 3] [--threads 1 2] [--skip-b16]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from zsad.backbone import load_clip
from zsad.methods.winclip import WinCLIP, harmonic_aggregation, incidence_matrix, window_indices


def loop_harmonic(window_scores: torch.Tensor, windows: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Per-patch Python loop: the straightforward (anomalib-style) aggregation, (B, K) -> (B, P)."""
    out = []
    for patch in range(num_patches):
        contains = (windows == patch).any(dim=1)
        out.append(contains.sum() / (1.0 / window_scores[:, contains]).sum(dim=1))
    return torch.stack(out, dim=1)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_aggregation(batch: int, repeats: int) -> None:
    grid = (15, 15)
    num = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(0)
    total_fast = total_loop = 0.0
    for size in (2, 3):
        windows = window_indices(grid, size)
        incidence = incidence_matrix(windows, num)
        scores = torch.rand(batch, windows.shape[0], generator=gen) * 0.98 + 0.01
        fast = harmonic_aggregation(scores, incidence)
        slow = loop_harmonic(scores, windows, num)
        assert torch.allclose(fast, slow, atol=1e-6), "vectorised and loop aggregation disagree"
        t_fast = best_time(lambda s=scores, i=incidence: harmonic_aggregation(s, i), repeats * 10)
        t_loop = best_time(lambda s=scores, w=windows: loop_harmonic(s, w, num), repeats)
        total_fast += t_fast
        total_loop += t_loop
        print(
            f"  {size}x{size} windows ({windows.shape[0]}), batch {batch}: vectorised {t_fast * 1e3:.3f} ms, "
            f"per-patch loop {t_loop * 1e3:.1f} ms, ratio {t_loop / t_fast:.0f}x"
        )
    print(f"  both scales: ratio {total_loop / total_fast:.0f}x (target >= 20x)")


def bench_throughput(name: str, image_size: int, batch: int, repeats: int) -> None:
    backbone = load_clip(name, pretrained="random", image_size=image_size, seed=0)
    detector = WinCLIP(backbone)
    detector.text_features("object")  # text is computed once per class; keep it out of the timing
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    detector.predict(images[:1], ["object"])  # warm-up
    seconds = best_time(lambda: detector.predict(images, ["object"] * batch), repeats)
    grid = backbone.grid_size
    windows = sum(w.shape[0] for w in detector.windows.values())
    print(
        f"  {name} @ {image_size} ({grid[0]}x{grid[1]} grid, {windows} windows + CLS), batch {batch}: "
        f"{batch / seconds:.2f} images/s ({seconds / batch * 1e3:.0f} ms/image)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-b16", action="store_true", help="only zsad-tiny (ViT-B-16+ is slow on a CPU)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, fp32")
    print("harmonic aggregation (15x15 grid):")
    bench_aggregation(8, args.repeats)
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"WinCLIP zero-shot predict, {threads} thread(s):")
        bench_throughput("zsad-tiny", 128, args.batch, args.repeats)
        if not args.skip_b16:
            bench_throughput("ViT-B-16-plus-240", 240, max(1, args.batch // 2), max(1, args.repeats - 1))


if __name__ == "__main__":
    main()
