"""Whether bfloat16 autocast pays off on this machine's CPU.

bfloat16 autocast on the CPU is fast only where the processor multiplies bfloat16 in hardware
(x86: AVX512_BF16 or AMX; Arm: the BF16 extension). Elsewhere oneDNN emulates it, and it is far
slower than float32, not faster. Measured on this project's machines, 2 cores each:

- Intel with AVX512_BF16: stage 2 of the demo recipe ran 1.7x and its stage-0 LLM 1.37x the float32 steps/s;
- AMD EPYC with AVX2 only: a 4096x256 by 256x688 Linear layer, forward and backward, took 1.51 s
  in bf16 autocast against 0.038 s in float32 (40x slower); one stage-0 LLM step took 47 s
  against 2.04 s;
- AMD EPYC with AVX512_BF16: the stage-0 LLM's 700 steps took 13.3 minutes in bf16 against 22.2 in
  float32, and 12.6 with its attention kernel in float32 (`FLOAT32_ATTENTION`); stage 2 6.7-6.8
  minutes in bf16.

So the synthetic recipe turns bf16 on by default only where the CPU has it natively, and a training
run asked for bf16 on a CPU without it warns. Where the recipe's stage-0 LLM trains in bf16, its
attention itself stays float32 (`FLOAT32_ATTENTION`): with bf16 attention it did not learn its lookups
(`synthetic.pipeline.Recipe`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging

logger = logging.get_logger(__name__)

CPU_INFO = Path("/proc/cpuinfo")
# CPU feature flags (as Linux lists them) of hardware bfloat16 arithmetic: x86's AVX512_BF16 and AMX, Arm's BF16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpu_info: Path | None = None) -> frozenset[str]:
    """The feature flags the kernel lists for the CPU (`CPU_INFO` by default); empty where there is no
    /proc/cpuinfo (not Linux)."""
    try:
        text = (cpu_info or CPU_INFO).read_text()
    except OSError:
        return frozenset()
    flags = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        # x86 lists them under "flags", Arm under "Features".
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_has_native_bf16(cpu_info: Path | None = None) -> bool:
    """True when the CPU multiplies bfloat16 in hardware; False when unknown, so the default stays float32."""
    return bool(cpu_flags(cpu_info) & NATIVE_BF16_FLAGS)


def warn_if_cpu_bf16_is_emulated(bf16: bool, on_cpu: bool, cpu_info: Path | None = None) -> bool:
    """Warn when a CPU run asks for bf16 autocast that this CPU can only emulate; returns whether it warned."""
    if not (bf16 and on_cpu) or cpu_has_native_bf16(cpu_info):
        return False
    logger.warning(
        "bf16 was asked for on a CPU without hardware bfloat16 (no AVX512_BF16, AMX or Arm BF16 flag): "
        "autocast will be emulated and run many times slower than float32 (40x for a Linear layer on an "
        "AVX2 machine). Leave out --bf16 on this machine."
    )
    return True


# The attention implementation (`attn_implementation`) that runs SDPA in float32 inside bf16 autocast.
FLOAT32_ATTENTION = "sdpa_float32"


def float32_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with autocast off and query, key and value in float32; the projections
    around it stay in the autocast's dtype.

    Why: trained from scratch under bf16 autocast on a CPU with AVX512_BF16, the stage-0 LLM's loss fell
    behind float32's from step 200 (0.028 higher at steps 250-300, same batches) and it did not learn
    its lookups; with only this kernel in float32 it kept level with float32 to step 450 (0.006 lower
    at steps 250-300, 0.007 higher at the end) at 1.6x float32's steps/s, against 1.7x for all of it in
    bf16. It then learnt every lookup but colour (docs/training.md).
    """
    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


def register_float32_attention() -> str:
    """Make `FLOAT32_ATTENTION` a valid `attn_implementation` (its masks are SDPA's); returns the name."""
    AttentionInterface.register(FLOAT32_ATTENTION, float32_sdpa_attention)
    AttentionMaskInterface.register(FLOAT32_ATTENTION, sdpa_mask)
    return FLOAT32_ATTENTION
