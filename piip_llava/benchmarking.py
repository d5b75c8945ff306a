"""Speed and memory benchmarks of the PIIP encoder and of PIIP-LLaVA generation, on one machine in one run.

Four suites, each timed with warm-up runs, several repetitions and the median:

- `encoder`: every requested PIIP variant (random weights, real sizes, batch 1), the same branches
  run bare (embedding and all blocks at their own resolution, no interactions) and the
  single-branch CLIP-L/336 baseline (transformers' `CLIPVisionModel`), with GFLOPs from
  `piip_llava.flops` and the achieved GFLOP/s against the machine's matmul peak;
- `perception`: a perception backbone (default: the PIIP-TSB 1568/1120/672 Mask R-CNN backbone)
  whole, without its merges and output scales, its bare branches, and the official single-branch
  detection baseline (DeiT-B at 1024 with windows), giving the interaction and merge overheads;
- `matmul`: that peak, a large dense `torch.mm` in the same dtype with the same thread count;
- `generate`: `generate()` prefill and cached decode speed of a small PIIP-LLaVA against
  transformers' `LlavaForConditionalGeneration` with the same LLM weights and a CLIP tower of
  similar cost and the same number of image tokens.

Cases of one suite are timed in interleaved rounds (case A, case B, ..., then again), so a
machine whose load drifts slows every case alike. On CPU the run is fp32 with eager PyTorch
kernels and SDPA attention; on a GPU it is bf16 with SDPA. Peak memory is the CUDA allocator's
peak during the call on a GPU (weights included) and the process's peak resident set during the
call on CPU (weights, Python and libraries included; reset before the call through
`/proc/self/clear_refs`, Linux only). A shared machine makes medians noisy: the minimum over the
rounds ("best") is reported beside them, and the interactions' share of the PIIP encoder's own
time is also measured inside its forward pass, which a uniformly loaded machine does not skew.

FLOP conventions: "GFLOPs" columns follow the papers (multiply-adds / 1e9); rates ("GFLOP/s")
count two FLOPs per multiply-add, as matmul peaks are usually quoted.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .dtypes import torch_dtype
from .flops import count_encoder_cost, load_vision_config
from .models.piip import PIIPVisionConfig, PIIPVisionModel

PUBLISHED_VARIANTS = (
    "clip-bl_512-256",
    "clip-bl_512-448",
    "convnext-b_clip-l_640-224",
    "convnext-b_clip-l_1024-336",
    "convnext-l_clip-l_1024-336",
)
# A default that finishes in a few minutes on two CPU cores.
DEFAULT_VARIANTS = ("clip-bl_512-256",)
BASELINE_CONFIG = "piip_vision_clip-l14_336"
BASELINE_NAME = "CLIP-L/14 @ 336 (transformers CLIPVisionModel)"


# ----- settings and machine ---------------------------------------------------------------------
@dataclass
class BenchSettings:
    """How every case of a run is executed."""

    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0
    repeats: int = 3
    warmup: int = 1
    attention: str = "sdpa"
    compile: bool = False

    @classmethod
    def resolve(cls, device: str | None = None, dtype: str | None = None, **options) -> BenchSettings:
        """Defaults per device: a GPU runs bf16, the CPU fp32 with all its cores."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        settings = cls(device=device, dtype=dtype, **{key: value for key, value in options.items() if value is not None})
        if settings.threads:
            torch.set_num_threads(settings.threads)
        settings.threads = torch.get_num_threads()
        return settings

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


def machine_description(settings: BenchSettings) -> dict:
    description = {
        "platform": platform.platform(),
        "processor": _cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": settings.threads,
        "torch": torch.__version__,
        "device": settings.device,
        "dtype": settings.dtype,
        "attention": settings.attention,
        "compiled": settings.compile,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if settings.torch_device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(settings.torch_device)
    return description


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ----- timing and memory ------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_timings(cases: dict[str, Callable[[], object]], settings: BenchSettings) -> dict[str, list[float]]:
    """Seconds per call of every case, measured in rounds that run each case once."""
    device = settings.torch_device
    with torch.inference_mode():
        for _ in range(settings.warmup):
            for run in cases.values():
                run()
        synchronize(device)
        timings = {name: [] for name in cases}
        for _ in range(settings.repeats):
            for name, run in cases.items():
                start = time.perf_counter()
                run()
                synchronize(device)
                timings[name].append(time.perf_counter() - start)
    return timings


def _proc_status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mib(run: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory during one call: CUDA allocator peak on a GPU, the process's peak RSS on CPU (None if unknown)."""
    gc.collect()
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            run()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) / 2**20
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM) to the current RSS
        except OSError:
            return None
        run()
        peak = _proc_status_kib("VmHWM")
    return None if peak is None else peak / 1024


def parameter_mib(model: torch.nn.Module) -> float:
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters()) / 2**20


# ----- matmul peak ------------------------------------------------------------------------------
def measure_matmul_peak(settings: BenchSettings, size: int | None = None) -> dict:
    """GFLOP/s of a square `torch.mm` (2 FLOPs per multiply-add): the machine's dense-matmul ceiling."""
    device, dtype = settings.torch_device, settings.torch_dtype
    size = size or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator(device="cpu").manual_seed(0)
    left = torch.randn(size, size, generator=generator).to(device, dtype)
    right = torch.randn(size, size, generator=generator).to(device, dtype)
    timings = interleaved_timings({"mm": lambda: torch.mm(left, right)}, _at_least(settings, repeats=5, warmup=2))
    seconds = statistics.median(timings["mm"])
    return {"size": size, "median_ms": 1e3 * seconds, "gflop_per_s": 2 * size**3 / seconds / 1e9}


def _at_least(settings: BenchSettings, repeats: int, warmup: int) -> BenchSettings:
    return BenchSettings(**{**asdict(settings), "repeats": max(settings.repeats, repeats), "warmup": max(settings.warmup, warmup)})


# ----- encoder suite ----------------------------------------------------------------------------
@dataclass
class CaseResult:
    """One timed case: a whole encoder or one bare branch."""

    variant: str
    case: str
    resolution: str
    gflops: float
    timings_s: list[float]
    peak_memory_mib: float | None = None
    weights_mib: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.timings_s)

    @property
    def images_per_s(self) -> float:
        return 1e3 / self.median_ms

    @property
    def best_ms(self) -> float:
        return 1e3 * min(self.timings_s)

    @property
    def achieved_gflop_per_s(self) -> float:
        return 2 * self.gflops / (self.median_ms / 1e3)

    @property
    def best_gflop_per_s(self) -> float:
        return 2 * self.gflops / (self.best_ms / 1e3)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(median_ms=self.median_ms, min_ms=self.best_ms, images_per_s=self.images_per_s,
                    achieved_gflop_per_s=self.achieved_gflop_per_s, best_gflop_per_s=self.best_gflop_per_s)
        return data


def randomise_interactions(model: PIIPVisionModel, std: float = 0.02, seed: int = 0) -> None:
    """Give zero-initialised interaction weights (gates, offsets, attention logits) small random values.

    A fresh encoder's interactions are the identity; with random values they sample and mix the way a
    trained model does, so the timing covers realistic sampling locations.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.interactions.named_parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def build_encoder(config: PIIPVisionConfig, settings: BenchSettings) -> PIIPVisionModel:
    config = copy.deepcopy(config)
    config._attn_implementation = settings.attention
    torch.manual_seed(0)
    model = PIIPVisionModel(config)
    randomise_interactions(model)
    model = model.to(settings.torch_device, settings.torch_dtype).eval()
    if settings.compile:
        model.compile_blocks()
    return model


def run_bare_branch(branch: torch.nn.Module, image: torch.Tensor):
    """A branch alone: its embedding and all its blocks at its own resolution, no interactions."""
    return branch.run_blocks(branch.embed(image), 0, branch.num_blocks - 1)


def encoder_variant_results(variant: str, settings: BenchSettings) -> tuple[list[CaseResult], dict]:
    """Time a PIIP variant and its bare branches (interleaved); returns the cases and the overhead summary."""
    config = load_vision_config(f"piip_vision_{variant}")
    cost = count_encoder_cost(config)
    model = build_encoder(config, settings)
    device, dtype = settings.torch_device, settings.torch_dtype
    pixel_values = torch.randn(1, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    pixel_values = pixel_values.to(device, dtype)
    branch_images = [
        F.interpolate(pixel_values, size=(branch.image_size,) * 2, mode="bilinear", align_corners=False)
        if branch.image_size != config.image_size
        else pixel_values
        for branch in model.branches
    ]
    cases = {"PIIP encoder": lambda: model(pixel_values)}
    for index, (branch, image) in enumerate(zip(model.branches, branch_images)):
        cases[f"bare branch {index + 1}"] = lambda branch=branch, image=image: run_bare_branch(branch, image)
    timings = interleaved_timings(cases, settings)
    interaction_share = measure_interaction_share(model, pixel_values, settings)

    resolutions = [str(branch.image_size) for branch in model.branches]
    branch_costs = cost.components[: len(model.branches)]
    results = [
        CaseResult(variant, "PIIP encoder", "/".join(resolutions), cost.gflops, timings["PIIP encoder"],
                   peak_memory_mib(cases["PIIP encoder"], device), parameter_mib(model))
    ]
    for index, branch in enumerate(model.branches):
        name = f"bare branch {index + 1}"
        label = branch_costs[index].name.split("(", 1)[-1].rstrip(")")
        results.append(
            CaseResult(variant, f"{name} ({label})", resolutions[index], branch_costs[index].gflops, timings[name],
                       peak_memory_mib(cases[name], device), parameter_mib(branch))
        )
    summary = interaction_overhead(variant, timings, cost)
    summary["interaction_share_in_forward"] = interaction_share
    return results, summary


def measure_interaction_share(model: PIIPVisionModel, pixel_values: torch.Tensor, settings: BenchSettings) -> float:
    """Median fraction of the encoder's forward time spent inside its interaction modules, timed by hooks."""
    device = settings.torch_device
    spent = []

    def start(module, args):
        synchronize(device)
        module.started_at = time.perf_counter()

    def stop(module, args, output):
        synchronize(device)
        spent.append(time.perf_counter() - module.started_at)

    handles = [hook for interaction in model.interactions for hook in (
        interaction.register_forward_pre_hook(start), interaction.register_forward_hook(stop))]
    shares = []
    try:
        with torch.inference_mode():
            for _ in range(max(settings.repeats, 1)):
                spent.clear()
                began = time.perf_counter()
                model(pixel_values)
                synchronize(device)
                shares.append(sum(spent) / (time.perf_counter() - began))
    finally:
        for handle in handles:
            handle.remove()
    return statistics.median(shares)


def interaction_overhead(variant: str, timings: dict[str, list[float]], cost) -> dict:
    """PIIP time over the sum of its bare branches' times, minus one: what the interactions (and glue) cost.

    Reported three ways: round by round (the cases of one round ran back to back) with the median
    ratio, from the medians, and from the best (minimum) times.
    """
    bare_names = [name for name in timings if name.startswith("bare branch")]
    ratios = [
        piip / sum(timings[name][round_index] for name in bare_names)
        for round_index, piip in enumerate(timings["PIIP encoder"])
    ]
    interaction_gflops = next(component.gflops for component in cost.components if component.name == "interactions")
    return {
        "variant": variant,
        "time_overhead": statistics.median(ratios) - 1.0,
        "time_overhead_of_medians": statistics.median(timings["PIIP encoder"])
        / sum(statistics.median(timings[name]) for name in bare_names)
        - 1.0,
        "time_overhead_of_best": min(timings["PIIP encoder"]) / sum(min(timings[name]) for name in bare_names) - 1.0,
        "interaction_flops_share": interaction_gflops / cost.gflops,
    }


def baseline_result(settings: BenchSettings) -> CaseResult:
    """transformers' CLIP-L/14 vision tower at 336 px, the LLaVA-1.5 encoder, with random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cost = count_encoder_cost(load_vision_config(BASELINE_CONFIG))
    config = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, hidden_act="quick_gelu",
    )
    config._attn_implementation = settings.attention
    torch.manual_seed(0)
    model = CLIPVisionModel(config).to(settings.torch_device, settings.torch_dtype).eval()
    pixel_values = torch.randn(1, 3, 336, 336).to(settings.torch_device, settings.torch_dtype)
    cases = {"baseline": lambda: model(pixel_values)}
    timings = interleaved_timings(cases, settings)
    return CaseResult("baseline", BASELINE_NAME, "336", cost.gflops, timings["baseline"],
                      peak_memory_mib(cases["baseline"], settings.torch_device), parameter_mib(model))


def run_encoder_suite(variants: list[str], settings: BenchSettings, matmul: dict | None = None) -> dict:
    matmul = matmul or measure_matmul_peak(settings)
    cases = [baseline_result(settings)]
    overheads = []
    for variant in variants:
        variant_cases, summary = encoder_variant_results(variant, settings)
        cases.extend(variant_cases)
        overheads.append(summary)
    return {"matmul_peak": matmul, "cases": [case.to_dict() for case in cases], "interaction_overhead": overheads}


# ----- perception suite -------------------------------------------------------------------------
DEFAULT_PERCEPTION_VARIANTS = ("mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16",)
# The official single-branch detection baseline (mmdetection/configs/piip/baseline/mask_rcnn_deit_vit_b_fpn_1x_coco_bs16.py):
# DeiT-B at 1024, windows of 14 in two of every three layers.
PERCEPTION_BASELINE = {
    "image_size": 1024, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "position_grid": 14, "window_sizes": [14, 14, None] * 4, "interaction_groups": [[0, 11]],
}  # fmt: skip
PERCEPTION_BASELINE_NAME = "ViT-B @ 1024 (DeiT-B, windows 14 in 8 of 12 layers; official detection baseline)"


def _meta_gflops(build: Callable[[], torch.nn.Module], run: Callable[[torch.nn.Module, torch.Tensor], object], shape) -> float:
    """Multiply-adds / 1e9 of `run(module, input)` counted on the meta device (FlopCounterMode counts 2 per MAC)."""
    from accelerate import init_empty_weights
    from torch.utils.flop_counter import FlopCounterMode

    with init_empty_weights(include_buffers=True):
        module = build().eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run(module, torch.empty(*shape, device="meta"))
    return counter.get_total_flops() / 2e9


def single_vit_branch(branch: dict, settings: BenchSettings):
    """A perception ViT branch on its own, as the baseline of the perception suite."""
    from .models.piip import PIIPPerceptionConfig
    from .models.piip.modeling_piip_perception import PerceptionViTBranch

    config = PIIPPerceptionConfig(branches=[branch, branch], resize_position_embeddings=True)
    config._attn_implementation = settings.attention
    return PerceptionViTBranch(config.branch_configs[0], config)


def _run_perception_branch(branch, image: torch.Tensor):
    """A branch alone: its embedding and all its blocks (a ViT branch, or the ConvNeXt branch adapter)."""
    from .models.piip.modeling_piip_perception import PerceptionViTBranch

    state = branch.embed(image, 1) if isinstance(branch, PerceptionViTBranch) else branch.embed(image)
    return branch.run_blocks(state, 0, branch.num_blocks - 1)


def perception_variant_results(variant: str, settings: BenchSettings) -> tuple[list[CaseResult], dict]:
    """Time a perception backbone, its pyramid without merges, its bare branches, and the ViT-B baseline."""
    from .flops import window_padding_macs
    from .models.piip import PIIPBackbone

    config = copy.deepcopy(load_vision_config(variant))
    config._attn_implementation = settings.attention
    cost = count_encoder_cost(config)
    padding = window_padding_macs(config) or [0] * config.num_branches
    outside = sum(component.gflops for component in cost.outside_total)
    # Branches and interactions; the rest of the backbone is its merges and output scales (some ConvNeXt
    # backbones count their merges in the total, as the official table does).
    pyramid_gflops = sum(c.gflops for c in cost.components if c.name.startswith("branch ") or c.name == "interactions")
    torch.manual_seed(0)
    model = PIIPBackbone(config)
    randomise_interactions(model.piip)
    model = model.to(settings.torch_device, settings.torch_dtype).eval()
    device, dtype = settings.torch_device, settings.torch_dtype
    size = config.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    images = model.piip.resize_for_branches(pixel_values)
    torch.manual_seed(0)
    baseline = single_vit_branch(PERCEPTION_BASELINE, settings).to(device, dtype).eval()
    baseline_size = PERCEPTION_BASELINE["image_size"]
    baseline_image = torch.randn(1, 3, baseline_size, baseline_size, generator=torch.Generator().manual_seed(1))
    baseline_image = baseline_image.to(device, dtype)
    cases = {"PIIP backbone": lambda: model(pixel_values), "PIIP pyramid": lambda: model.piip(pixel_values)}
    for index, (branch, image) in enumerate(zip(model.piip.branches, images)):
        cases[f"bare branch {index + 1}"] = lambda branch=branch, image=image: _run_perception_branch(branch, image)
    cases["baseline"] = lambda: _run_perception_branch(baseline, baseline_image)
    timings = interleaved_timings(cases, settings)

    resolutions = [str(branch.image_size) for branch in config.branch_configs]
    joined = "/".join(resolutions)
    baseline_gflops = _meta_gflops(
        lambda: single_vit_branch(PERCEPTION_BASELINE, settings), _run_perception_branch, tuple(baseline_image.shape)
    )
    results = [
        CaseResult(variant, "PIIP backbone (with merges and scales)", joined, cost.gflops + outside,
                   timings["PIIP backbone"], peak_memory_mib(cases["PIIP backbone"], device), parameter_mib(model)),
        CaseResult(variant, "PIIP pyramid (branches and interactions)", joined, pyramid_gflops + sum(padding) / 1e9,
                   timings["PIIP pyramid"], peak_memory_mib(cases["PIIP pyramid"], device), parameter_mib(model.piip)),
    ]  # fmt: skip
    for index, branch in enumerate(model.piip.branches):
        name = f"bare branch {index + 1}"
        label = cost.components[index].name.split("(", 1)[-1].rstrip(")")
        results.append(
            CaseResult(variant, f"{name} ({label})", resolutions[index], cost.components[index].gflops + padding[index] / 1e9,
                       timings[name], peak_memory_mib(cases[name], device), parameter_mib(branch))
        )  # fmt: skip
    results.append(
        CaseResult(variant, PERCEPTION_BASELINE_NAME, str(baseline_size), baseline_gflops, timings["baseline"],
                   peak_memory_mib(cases["baseline"], device), parameter_mib(baseline))
    )  # fmt: skip
    bare_names = [name for name in timings if name.startswith("bare branch")]
    interaction_ratios = [
        pyramid / sum(timings[name][round_index] for name in bare_names)
        for round_index, pyramid in enumerate(timings["PIIP pyramid"])
    ]
    merge_ratios = [full / pyramid for full, pyramid in zip(timings["PIIP backbone"], timings["PIIP pyramid"])]
    summary = {
        "variant": variant,
        "interaction_overhead": statistics.median(interaction_ratios) - 1.0,
        "merge_overhead": statistics.median(merge_ratios) - 1.0,
        "backbone_over_baseline": statistics.median(
            [full / base for full, base in zip(timings["PIIP backbone"], timings["baseline"])]
        ),
        "interaction_share_in_forward": measure_interaction_share(model.piip, pixel_values, settings),
        "interaction_flops_share": next(c.gflops for c in cost.components if c.name == "interactions") / (cost.gflops + outside),
        "merge_flops_share": (cost.gflops + outside - pyramid_gflops) / (cost.gflops + outside),
    }
    return results, summary


def run_perception_suite(variants: list[str], settings: BenchSettings, matmul: dict | None = None) -> dict:
    matmul = matmul or measure_matmul_peak(settings)
    cases, overheads = [], []
    for variant in variants:
        variant_cases, summary = perception_variant_results(variant, settings)
        cases.extend(variant_cases)
        overheads.append(summary)
    return {"matmul_peak": matmul, "cases": [case.to_dict() for case in cases], "overheads": overheads}


# ----- generation suite -------------------------------------------------------------------------
GENERATION_TEXT_CONFIG = {
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
GENERATION_IMAGE_TOKEN = 31999


def _clip_backbone(hidden: int, layers: int, heads: int) -> dict:
    return {
        "model_type": "clip_vision_model", "hidden_size": hidden, "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "image_size": 224, "patch_size": 16,
        "hidden_act": "quick_gelu",
    }


def small_piip_vision_config() -> PIIPVisionConfig:
    """A two-branch CLIP pyramid (384-d @ 224 px, 192-d @ 256 px) giving 16 x 16 = 256 image tokens."""
    return PIIPVisionConfig(
        branches=[
            {"backbone_config": _clip_backbone(384, 6, 6), "image_size": 224, "interaction_groups": [[0, 2], [3, 5]]},
            {"backbone_config": _clip_backbone(192, 6, 3), "image_size": 256, "interaction_groups": [[0, 2], [3, 5]]},
        ],
        deform_num_heads=8,
    )


def baseline_clip_backbone() -> dict:
    """A single CLIP (384-d, 6 layers) at 256 px: 256 image tokens, about the small pyramid's cost."""
    return {**_clip_backbone(384, 6, 6), "image_size": 256}


def build_generation_models(settings: BenchSettings):
    """The small PIIP-LLaVA and a transformers LLaVA sharing its LLM and LM-head weights."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from .models.piip_llava import PIIPLlavaConfig, PIIPLlavaForConditionalGeneration

    vision_config = small_piip_vision_config()
    piip_config = PIIPLlavaConfig(
        vision_config=vision_config.to_dict(), text_config=GENERATION_TEXT_CONFIG,
        image_token_index=GENERATION_IMAGE_TOKEN,
    )
    piip_config._attn_implementation = settings.attention
    torch.manual_seed(0)
    piip = PIIPLlavaForConditionalGeneration(piip_config)
    randomise_interactions(piip.model.vision_tower)

    clip = {key: value for key, value in baseline_clip_backbone().items() if key != "model_type"}
    llava_config = LlavaConfig(
        vision_config=CLIPVisionConfig(**clip).to_dict(), text_config=GENERATION_TEXT_CONFIG,
        image_token_index=GENERATION_IMAGE_TOKEN, image_seq_length=(clip["image_size"] // clip["patch_size"]) ** 2,
    )
    llava_config._attn_implementation = settings.attention
    llava = LlavaForConditionalGeneration(llava_config)
    llava.model.language_model.load_state_dict(piip.model.language_model.state_dict())
    llava.lm_head.load_state_dict(piip.lm_head.state_dict())
    models = {}
    for name, model in (("PIIP-LLaVA", piip), ("transformers LLaVA", llava)):
        model = model.to(settings.torch_device, settings.torch_dtype).eval()
        if settings.compile and name == "PIIP-LLaVA":
            model.model.vision_tower.compile_blocks()
        models[name] = model
    image_sizes = {"PIIP-LLaVA": vision_config.image_size, "transformers LLaVA": clip["image_size"]}
    image_tokens = {"PIIP-LLaVA": piip_config.num_image_tokens, "transformers LLaVA": llava_config.image_seq_length}
    return models, image_sizes, image_tokens


def vision_gflops(name: str) -> float:
    if name == "PIIP-LLaVA":
        return count_encoder_cost(small_piip_vision_config()).gflops
    single_branch = PIIPVisionConfig(
        branches=[{"backbone_config": baseline_clip_backbone(), "image_size": 256, "interaction_groups": [[0, 5]]}]
    )
    return count_encoder_cost(single_branch).gflops


def run_generate_suite(settings: BenchSettings, decode_tokens: int = 32, text_tokens: int = 32) -> dict:
    """Prefill (image encoding included) and cached decode speed of both models, interleaved."""
    models, image_sizes, image_tokens = build_generation_models(settings)
    device, dtype = settings.torch_device, settings.torch_dtype
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, 31000, (text_tokens,), generator=generator).tolist()
    cases, inputs = {}, {}
    for name, model in models.items():
        ids = [1] + text[: text_tokens // 2] + [GENERATION_IMAGE_TOKEN] * image_tokens[name] + text[text_tokens // 2 :]
        input_ids = torch.tensor([ids], device=device)
        pixel_values = torch.randn(1, 3, image_sizes[name], image_sizes[name], generator=generator).to(device, dtype)
        inputs[name] = (input_ids, pixel_values)
        for new_tokens in (1, decode_tokens + 1):
            cases[(name, new_tokens)] = _generate_call(model, input_ids, pixel_values, new_tokens)
        cases[(name, "vision")] = lambda model=model, pixel_values=pixel_values: model.model.get_image_features(
            pixel_values
        )
    timings = interleaved_timings(cases, settings)
    rows = []
    for name, model in models.items():
        prefill = statistics.median(timings[(name, 1)])
        # Decode time per round: the longer run minus the prefill-only run of the same round.
        decode_seconds = [full - first for full, first in zip(timings[(name, decode_tokens + 1)], timings[(name, 1)])]
        prompt_length = inputs[name][0].shape[1]
        rows.append({
            "model": name,
            "llm_parameters_m": sum(p.numel() for p in model.model.language_model.parameters()) / 1e6,
            "vision_parameters_m": sum(p.numel() for p in model.model.vision_tower.parameters()) / 1e6,
            "vision_gflops": vision_gflops(name),
            "image_tokens": image_tokens[name],
            "prompt_tokens": prompt_length,
            "vision_ms": 1e3 * statistics.median(timings[(name, "vision")]),
            "prefill_ms": 1e3 * prefill,
            "prefill_tokens_per_s": prompt_length / prefill,
            "decode_tokens_per_s": decode_tokens / statistics.median(decode_seconds),
            "decode_tokens_per_s_best": decode_tokens / (min(timings[(name, decode_tokens + 1)]) - min(timings[(name, 1)])),
            "peak_memory_mib": peak_memory_mib(cases[(name, decode_tokens + 1)], device),
            "timings_s": {str(key[1]): value for key, value in timings.items() if key[0] == name},
        })
    return {
        "decode_tokens": decode_tokens,
        "rows": rows,
        "decode_ratio_piip_over_llava": rows[0]["decode_tokens_per_s"] / rows[1]["decode_tokens_per_s"],
        "decode_ratio_best": rows[0]["decode_tokens_per_s_best"] / rows[1]["decode_tokens_per_s_best"],
    }


def _generate_call(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, new_tokens: int) -> Callable:
    def run():
        return model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
        )

    return run


# ----- reports ----------------------------------------------------------------------------------
def _format_memory(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def format_report(report: dict) -> str:
    """The whole run as markdown: machine, matmul peak, encoder table, overheads, generation table."""
    machine = report["machine"]
    lines = [
        (
            f"Machine: {machine['processor']}, {machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads, "
            f"device {machine['device']}{' (' + machine['gpu'] + ')' if 'gpu' in machine else ''}, {machine['dtype']}, "
            f"attention {machine['attention']}, compiled blocks: {machine['compiled']}, torch {machine['torch']}; "
            f"load average at start {machine.get('load_average_at_start')}; "
            f"{report['settings']['repeats']} timed rounds after {report['settings']['warmup']} warm-up, medians."
        ),
        "",
    ]
    matmul = report.get("matmul_peak")
    if matmul:
        peak_line = f"Dense matmul peak: torch.mm {matmul['size']}^3 in {machine['dtype']}: "
        peak_line += f"**{matmul['gflop_per_s']:.1f} GFLOP/s** ({matmul['median_ms']:.1f} ms)."
        lines += [peak_line, ""]
    encoder = report.get("encoder")
    if encoder:
        peak = encoder["matmul_peak"]["gflop_per_s"]
        header = "| variant | case | resolution | GFLOPs | median ms | best ms | images/s | GFLOP/s (median / best) "
        header += "| % of mm peak (median / best) | peak mem MiB | weights MiB |"
        lines += [header, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for case in encoder["cases"]:
            lines.append(
                f"| {case['variant']} | {case['case']} | {case['resolution']} | {case['gflops']:.1f} "
                f"| {case['median_ms']:.0f} | {case['min_ms']:.0f} | {case['images_per_s']:.2f} "
                f"| {case['achieved_gflop_per_s']:.0f} / {case['best_gflop_per_s']:.0f} "
                f"| {100 * case['achieved_gflop_per_s'] / peak:.0f}% / {100 * case['best_gflop_per_s'] / peak:.0f}% "
                f"| {_format_memory(case['peak_memory_mib'])} | {case['weights_mib']:.0f} |"
            )
        lines += [
            "",
            "Interaction overhead = PIIP time / sum of its bare branches' times - 1 (per-round median ratio; from "
            + "medians; from best times), and the interactions' share of the PIIP forward time timed inside it:",
            "",
            "| variant | overhead (per round) | overhead (medians) | overhead (best) | interactions' share of PIIP time "
            + "| interactions' share of FLOPs |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for overhead in encoder["interaction_overhead"]:
            lines.append(
                f"| {overhead['variant']} | {100 * overhead['time_overhead']:+.1f}% "
                f"| {100 * overhead['time_overhead_of_medians']:+.1f}% | {100 * overhead['time_overhead_of_best']:+.1f}% "
                f"| {100 * overhead['interaction_share_in_forward']:.1f}% "
                f"| {100 * overhead['interaction_flops_share']:.1f}% |"
            )
        lines.append("")
    perception = report.get("perception")
    if perception:
        lines += _format_perception(perception)
    generate = report.get("generate")
    if generate:
        lines += [
            f"`generate()` with the KV cache, batch 1, greedy, {generate['decode_tokens']} decoded tokens:",
            "",
            "| model | LLM params (M) | vision params (M) | vision GFLOPs | image tokens | prompt tokens | vision ms "
            + "| prefill ms | prefill tokens/s | decode tokens/s (median / best) | peak mem MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in generate["rows"]:
            lines.append(
                f"| {row['model']} | {row['llm_parameters_m']:.1f} | {row['vision_parameters_m']:.1f} "
                f"| {row['vision_gflops']:.2f} | {row['image_tokens']} | {row['prompt_tokens']} | {row['vision_ms']:.0f} "
                f"| {row['prefill_ms']:.0f} | {row['prefill_tokens_per_s']:.0f} "
                f"| {row['decode_tokens_per_s']:.1f} / {row['decode_tokens_per_s_best']:.1f} "
                f"| {_format_memory(row['peak_memory_mib'])} |"
            )
        ratios = f"**{generate['decode_ratio_piip_over_llava']:.3f}x** (medians), {generate['decode_ratio_best']:.3f}x (best)"
        lines += ["", f"Decode speed PIIP-LLaVA / LLaVA: {ratios}", ""]
    return "\n".join(lines)


def _format_perception(perception: dict) -> list[str]:
    peak = perception["matmul_peak"]["gflop_per_s"]
    lines = [
        "Perception backbones (batch 1, square input at the last branch's size), bare branches and the ViT-B baseline:",
        "",
        "| variant | case | resolution | GFLOPs | median ms | best ms | GFLOP/s (median) | % of mm peak | peak mem MiB "
        + "| weights MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in perception["cases"]:
        lines.append(
            f"| {case['variant']} | {case['case']} | {case['resolution']} | {case['gflops']:.1f} | {case['median_ms']:.0f} "
            f"| {case['min_ms']:.0f} | {case['achieved_gflop_per_s']:.0f} | {100 * case['achieved_gflop_per_s'] / peak:.0f}% "
            f"| {_format_memory(case['peak_memory_mib'])} | {case['weights_mib']:.0f} |"
        )
    lines += [
        "",
        "Interaction overhead = pyramid time / sum of its bare branches' times - 1; merge overhead = backbone time / "
        + "pyramid time - 1 (per-round medians); backbone / baseline = backbone time over the ViT-B @ 1024 time:",
        "",
        "| variant | interaction overhead | interactions' share of pyramid time | interactions' share of FLOPs "
        + "| merge overhead | merges' share of FLOPs | backbone / ViT-B baseline |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for overhead in perception["overheads"]:
        lines.append(
            f"| {overhead['variant']} | {100 * overhead['interaction_overhead']:+.1f}% "
            f"| {100 * overhead['interaction_share_in_forward']:.1f}% | {100 * overhead['interaction_flops_share']:.1f}% "
            f"| {100 * overhead['merge_overhead']:+.1f}% | {100 * overhead['merge_flops_share']:.1f}% "
            f"| {overhead['backbone_over_baseline']:.2f}x |"
        )
    return lines + [""]


def write_report(report: dict, output_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write `<name>.md` and `<name>.json` under `output_dir`; returns both paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown_path, json_path = output_dir / f"{name}.md", output_dir / f"{name}.json"
    markdown_path.write_text(format_report(report) + "\n", encoding="utf-8")
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return markdown_path, json_path


def run_benchmarks(
    suites: list[str],
    settings: BenchSettings,
    variants: list[str],
    decode_tokens: int = 32,
    perception_variants: list[str] | None = None,
) -> dict:
    """Run the requested suites ('matmul', 'encoder', 'perception', 'generate') and gather one report."""
    report = {"machine": machine_description(settings), "settings": asdict(settings)}
    if "matmul" in suites or "encoder" in suites or "perception" in suites:
        report["matmul_peak"] = measure_matmul_peak(settings)
    if "encoder" in suites:
        report["encoder"] = run_encoder_suite(variants, settings, report["matmul_peak"])
    if "perception" in suites:
        report["perception"] = run_perception_suite(perception_variants or list(DEFAULT_PERCEPTION_VARIANTS), settings,
                                                    report["matmul_peak"])
    if "generate" in suites:
        report["generate"] = run_generate_suite(settings, decode_tokens=decode_tokens)
    if hasattr(os, "getloadavg"):
        report["machine"]["load_average_at_end"] = list(os.getloadavg())
    return report


__all__ = [
    "DEFAULT_PERCEPTION_VARIANTS",
    "DEFAULT_VARIANTS",
    "PUBLISHED_VARIANTS",
    "BenchSettings",
    "format_report",
    "interleaved_timings",
    "measure_matmul_peak",
    "peak_memory_mib",
    "run_benchmarks",
    "write_report",
]
