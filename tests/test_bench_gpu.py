"""benchmarks/bench_gpu.py runs end to end on the CPU and, for its CUDA branch, on the emulated card of
tests/emulated_cuda.py (smoke runs of its smallest grid; docs/gpu.md): the one run a lent GPU gets should
not be spent on a placement slip in the benchmark."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import emulated_cuda as emulator
import pandas as pd
import torch
from emulated_cuda import emulated_cuda

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_gpu_benchmark_runs_on_the_cpu_and_writes_its_table(tmp_path):
    bench = load_bench()
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


def test_gpu_benchmark_cuda_branch_runs_on_the_emulated_card(tmp_path, monkeypatch):
    bench = load_bench()
    # The CUDA runtime calls the benchmark makes (timing and memory) have no card behind them here.
    for name, stub in {
        "synchronize": lambda device=None: None,
        "reset_peak_memory_stats": lambda device=None: None,
        "max_memory_allocated": lambda device=None: 0,
        "empty_cache": lambda: None,
    }.items():
        monkeypatch.setattr(torch.cuda, name, stub)
    argv = ["--device", "cuda", "--backbones", "zsad-tiny", "--methods", "aprilgan", "--batches", "1", "2"]
    argv += ["--precisions", "fp32", "--epoch-images", "2", "--cpu-images", "2", "--out", str(tmp_path)]
    before = emulator.operations_on_device
    with emulated_cuda(monkeypatch):
        table = bench.main(argv)
    assert emulator.operations_on_device - before > 1000  # the timed work ran on the (emulated) device
    assert set(table["device"]) == {"cuda:0"} and len(table) == 3  # two batch sizes and one epoch row
    assert (table["images_per_s"].dropna() > 0).all() and (table["ratio"] > 0).all()
    assert table["epoch_s"].dropna().iloc[0] > 0
