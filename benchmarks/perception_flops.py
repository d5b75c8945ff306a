"""`piip-llava flops` on every bundled perception config, beside the official tables' figures.

    python benchmarks/perception_flops.py [TABLE_MD]

TABLE_MD defaults to the copy of the official `released_models_tables.md` in
tests/fixtures/released_configs_perception. Prints one markdown row per bundled config: our
parameters and GFLOPs (the total as the tables count it, see `piip_llava.flops.count_perception_cost`),
the official ones where the tables give them, and the differences. Counting runs on the meta
device (no weights); about 15 s per config on 2 CPU cores.
"""

from __future__ import annotations

import sys
from pathlib import Path

from piip_llava.conversion.perception import official_table_figures
from piip_llava.flops import count_perception_cost, load_vision_config

ROOT = Path(__file__).resolve().parent.parent


def main(table_path: Path) -> int:
    official = official_table_figures(table_path.read_text(encoding="utf-8"))
    print("| config | params (M) | official | diff | GFLOPs | official | diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for path in sorted((ROOT / "configs" / "perception").glob("*.json")):
        cost = count_perception_cost(load_vision_config(path))
        params, gflops = cost.parameters / 1e6, cost.gflops
        official_params, official_gflops = official.get(path.stem, (None, None))

        def diff(ours: float, theirs: float | None) -> str:
            return "" if theirs is None else f"{100 * (ours / theirs - 1):+.1f}%"

        print(
            f"| {path.stem} | {params:.1f} | {official_params or ''} | {diff(params, official_params)} "
            f"| {gflops:.1f} | {official_gflops or ''} | {diff(gflops, official_gflops)} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    default = ROOT / "tests" / "fixtures" / "released_configs_perception" / "released_models_tables.md"
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else default))
