"""The demo-schedule benchmark's arithmetic and its measuring loop (a real encoder stage-0 step, timed)."""

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_demo_schedule.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_demo_schedule", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_side_by_side_runs_the_longer_loop_alone_once_the_shorter_one_ends(bench):
    # 100 encoder steps at 1 s side by side end after 100 s; the LLM has done 50 of its 80 steps at 2 s
    # and runs the other 30 alone at 1.5 s: 100 + 45 seconds.
    assert bench.side_by_side_minutes((100, 80), (1.0, 2.0), (0.5, 1.5)) == pytest.approx(145 / 60)
    # The other way round: the LLM's loop ends first.
    assert bench.side_by_side_minutes((100, 10), (1.0, 2.0), (0.5, 1.5)) == pytest.approx((20 + 80 * 0.5) / 60)


@pytest.fixture
def keep_torch_threads():
    """`run_role` sets the process's torch threads, as its own process would; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("data_workers", [0, 1])
def test_the_encoder_loop_is_timed_over_real_steps(bench, data_workers, keep_torch_threads):
    args = argparse.Namespace(role="encoder", threads=1, seconds=0.01, data_workers=data_workers, llm_dir=None,
                              compile=False)
    result = bench.run_role(args)
    assert result["role"] == "encoder" and result["data_workers"] == data_workers
    assert result["steps"] >= 1 and result["seconds_per_step"] > 0
