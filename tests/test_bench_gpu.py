"""benchmarks/bench_gpu.py runs end to end on the CPU (a smoke run of its smallest grid; docs/gpu.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def test_gpu_benchmark_runs_on_the_cpu_and_writes_its_table(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--device", "cpu", "--backbones", "zsad-tiny", "--methods", "anomalyclip", "--batches", "1"]
    argv += ["--precisions", "fp32", "fp16", "--epoch-images", "2", "--out", str(tmp_path)]
    table = bench.main(argv)
    saved = pd.read_csv(tmp_path / "bench_gpu.csv")
    assert len(saved) == len(table) == 2  # fp16 is skipped on the CPU: one predict row, one epoch row
    speed = saved.dropna(subset=["images_per_s"]).iloc[0]
    assert speed["precision"] == "fp32" and speed["images_per_s"] > 0 and speed["ratio"] > 0
    epoch = saved.dropna(subset=["epoch_s"]).iloc[0]
    assert epoch["epoch_s"] > 0 and epoch["cpu_epoch_s"] > 0
    assert "| method |" in (tmp_path / "bench_gpu.md").read_text()
