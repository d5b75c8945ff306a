"""`piip-llava bench encoder|perception|generate|matmul|all`: speed and memory of the encoder and of generation.

See `piip_llava/benchmarking.py` for what is measured and how; `docs/performance.md` for results.
"""

from __future__ import annotations

import argparse
import sys

from ..dtypes import DTYPES

SUITES = {
    "matmul": ["matmul"],
    "encoder": ["encoder"],
    "perception": ["perception"],
    "generate": ["generate"],
    "all": ["encoder", "generate"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=sorted(SUITES), help="what to measure ('all' = encoder and generate)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="VARIANT",
        help="encoder variants by config name without the 'piip_vision_' prefix (e.g. clip-bl_512-256), or 'published' "
        "for all published LLaVA encoders; default: clip-bl_512-256, which takes a few minutes on 2 CPU cores",
    )
    parser.add_argument(
        "--perception-variants",
        nargs="+",
        default=None,
        metavar="CONFIG",
        help="perception suite: configs/perception names or JSON paths (default: "
        "mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16; about 10 minutes on 2 CPU cores)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 3); the median is reported")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds before timing (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="default: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--attention", default=None, choices=["sdpa", "eager"], help="attention inside the branches (default sdpa)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder blocks (compile_blocks)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per generate() run (default 32)")
    parser.add_argument("--output-dir", default="benchmarks/results", help="where the .md and .json reports go")
    parser.add_argument("--name", default=None, help="report file stem (default: bench_<suite>_<device>)")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark the encoder, generation and the machine's matmul peak",
        description="Time PIIP encoders against their bare branches and the CLIP-L/336 baseline, the machine's "
        "dense matmul peak, and PIIP-LLaVA generate() against transformers' LLaVA with the same LLM. Random "
        "weights at real sizes; prints a markdown table and writes it with a JSON file.",
    )
    add_arguments(parser)
    parser.set_defaults(handler=run_bench)


def run_bench(args) -> int:
    # Imported here so that `piip-llava --help` does not pay for importing torch.
    from ..benchmarking import (
        DEFAULT_VARIANTS,
        PUBLISHED_VARIANTS,
        BenchSettings,
        format_report,
        run_benchmarks,
        write_report,
    )
    from ..flops import bundled_config_names

    variants = list(args.variants or DEFAULT_VARIANTS)
    if variants == ["published"]:
        variants = list(PUBLISHED_VARIANTS)
    unknown = [variant for variant in variants if f"piip_vision_{variant}" not in bundled_config_names()]
    if unknown:
        known = sorted(name.removeprefix("piip_vision_") for name in bundled_config_names() if name.startswith("piip_vision_"))
        print(f"error: unknown variant(s) {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    settings = BenchSettings.resolve(
        device=args.device, dtype=args.dtype, threads=args.threads, repeats=args.repeats, warmup=args.warmup,
        attention=args.attention, compile=args.compile or None,
    )
    report = run_benchmarks(
        SUITES[args.suite], settings, variants, decode_tokens=args.decode_tokens,
        perception_variants=args.perception_variants,
    )  # fmt: skip
    name = args.name or f"bench_{args.suite}_{settings.torch_device.type}"
    markdown_path, json_path = write_report(report, args.output_dir, name)
    print(format_report(report))
    print(f"written: {markdown_path} and {json_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python benchmarks/run_benchmarks.py`, the same options as `piip-llava bench`."""
    parser = argparse.ArgumentParser(prog="run_benchmarks.py", description="PIIP speed and memory benchmarks.")
    add_arguments(parser)
    return run_bench(parser.parse_args(argv))
