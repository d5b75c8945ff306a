"""`piip-llava bench perception`: the cases it times and the overheads it derives from them."""

from __future__ import annotations

import json
import statistics

import pytest

from piip_llava import benchmarking
from piip_llava.benchmarking import BenchSettings, format_report, run_benchmarks
from piip_llava.models.piip import PIIPPerceptionConfig

VIT_BRANCHES = [
    {"image_size": 32, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "position_grid": 2,
     "window_sizes": [2, None], "interaction_groups": [[0, 0], [1, 1]]},
    {"image_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 1, "position_grid": 4,
     "window_sizes": [3, 3], "interaction_groups": [[0, 0], [1, 1]]},
]  # fmt: skip
# A ConvNeXt last branch with the intermediate merges of the official ConvNeXt detection configs.
CONVNEXT_BRANCHES = [
    {**VIT_BRANCHES[0], "window_sizes": [2, None, None, None], "num_hidden_layers": 4,
     "interaction_groups": [[0, 0], [1, 1], [2, 2], [3, 3]]},
    {"branch_type": "convnext", "image_size": 64, "convnext_config": {"depths": [1, 1, 1, 1], "hidden_sizes": [32, 32, 32, 32]},
     "interaction_groups": [[0, 0], [1, 2], [3, 4], [5, 6]]},
]  # fmt: skip
CONVNEXT_OPTIONS = {"with_simple_fpn": False, "out_interaction_indexes": [0, 1, 2]}


@pytest.mark.parametrize("branches, options", [(VIT_BRANCHES, {}), (CONVNEXT_BRANCHES, CONVNEXT_OPTIONS)], ids=["vit", "convnext"])
def test_perception_suite_times_backbone_pyramid_bare_branches_and_baseline(tmp_path, monkeypatch, branches, options):
    config = PIIPPerceptionConfig(branches=branches, resize_position_embeddings=True, deform_num_heads=2, **options)
    path = tmp_path / "tiny_backbone.json"
    path.write_text(json.dumps(config.to_diff_dict()))
    tiny_baseline = {**benchmarking.PERCEPTION_BASELINE, "image_size": 64, "hidden_size": 32, "num_attention_heads": 2,
                     "num_hidden_layers": 3, "window_sizes": [2, 2, None], "interaction_groups": [[0, 2]]}  # fmt: skip
    monkeypatch.setattr(benchmarking, "PERCEPTION_BASELINE", tiny_baseline)
    measure = benchmarking.measure_matmul_peak
    monkeypatch.setattr(benchmarking, "measure_matmul_peak", lambda settings: measure(settings, size=256))
    settings = BenchSettings.resolve(device="cpu", repeats=3, warmup=0)
    report = run_benchmarks(["perception"], settings, [], perception_variants=[str(path)])

    cases = report["perception"]["cases"]
    assert [case["case"].split(" (")[0] for case in cases] == [
        "PIIP backbone", "PIIP pyramid", "bare branch 1", "bare branch 2", "ViT-B @ 1024",
    ]  # fmt: skip
    assert cases[0]["gflops"] > cases[1]["gflops"] > cases[2]["gflops"] + cases[3]["gflops"]
    overhead = report["perception"]["overheads"][0]
    pyramid, bare = cases[1]["timings_s"], [cases[2]["timings_s"], cases[3]["timings_s"]]
    expected = statistics.median([p / (a + b) for p, a, b in zip(pyramid, *bare)]) - 1
    assert overhead["interaction_overhead"] == expected
    assert "merge overhead" in format_report(report) and "backbone / ViT-B baseline" in format_report(report)
