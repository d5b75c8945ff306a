"""Training throughput and peak memory of PIIP-LLaVA for a tiny and a small configuration.

Runs the real training path (the supervised dataset with generated images, the collator, the
model's loss, AdamW) for a few steps after a warm-up and prints samples per second and peak
memory: `torch.cuda.max_memory_allocated` on a GPU, the process's peak resident set size on
the CPU (tracemalloc would miss torch's own allocations). Stage 2 (everything trains) is the
heavier stage, so that is what is measured.

    python benchmarks/bench_training.py [--configs tiny small] [--steps 5] [--batch-size 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import CORPUS, tiny_clip_backbone
from training_fixtures import write_llava_dataset
from transformers import LlamaConfig

from piip_llava import PIIPLlavaConfig, PIIPLlavaForConditionalGeneration
from piip_llava.models.piip import PIIPVisionConfig
from piip_llava.models.piip.image_processing_piip import PIIPImageProcessor
from piip_llava.tokenizer_training import train_llama_style_tokenizer
from piip_llava.training import LlavaDataCollator, LlavaSupervisedDataset

# (vision branches as (hidden, layers, heads, image size), LLM hidden, LLM layers)
CONFIGS = {
    "tiny": {"branches": [(48, 2, 4, 32), (32, 2, 2, 64)], "llm_hidden": 64, "llm_layers": 2},
    "small": {"branches": [(384, 4, 6, 112), (192, 4, 3, 224)], "llm_hidden": 512, "llm_layers": 8},
}


def build_model(name: str, vocab_size: int, image_token_index: int) -> PIIPLlavaForConditionalGeneration:
    spec = CONFIGS[name]
    layers = spec["branches"][0][1]
    groups = [[index, index] for index in range(layers)]
    branches = [
        {"backbone_config": tiny_clip_backbone(hidden, depth, heads, image_size=size), "image_size": size,
         "interaction_groups": groups}
        for hidden, depth, heads, size in spec["branches"]
    ]
    vision = PIIPVisionConfig(branches=branches, deform_num_heads=2, deform_num_points=4)
    text = LlamaConfig(
        hidden_size=spec["llm_hidden"], intermediate_size=spec["llm_hidden"] * 4, num_hidden_layers=spec["llm_layers"],
        num_attention_heads=8 if spec["llm_hidden"] >= 256 else 4, vocab_size=vocab_size,
        max_position_embeddings=1024,
    )
    config = PIIPLlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                             image_token_index=image_token_index, projector_num_groups=8)
    return PIIPLlavaForConditionalGeneration(config)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def benchmark(name: str, steps: int, batch_size: int, device: torch.device, workdir: Path) -> dict:
    tokenizer = train_llama_style_tokenizer(CORPUS, vocab_size=300)
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    model = build_model(name, len(tokenizer), image_token_index).to(device).train()
    records, images = write_llava_dataset(workdir / name, batch_size * (steps + 1), "finetune")
    image_processor = PIIPImageProcessor.from_vision_config(model.config.vision_config)
    dataset = LlavaSupervisedDataset(records, tokenizer, image_processor, num_image_tokens=model.config.num_image_tokens,
                                     image_folder=images, image_token_id=image_token_index, max_length=1024)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                         collate_fn=LlavaDataCollator(pad_token_id=tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elapsed, measured = 0.0, 0
    for step, batch in enumerate(loader):
        batch = {key: value.to(device) for key, value in batch.items()}
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step > 0:  # the first step pays one-time costs (allocation, kernel selection)
            elapsed += time.perf_counter() - start
            measured += batch["input_ids"].shape[0]
    return {
        "config": name,
        "parameters_m": round(sum(parameter.numel() for parameter in model.parameters()) / 1e6, 2),
        "image_tokens": model.config.num_image_tokens,
        "batch_size": batch_size,
        "samples_per_s": round(measured / elapsed, 2),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "device": str(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=5, help="measured steps (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.configs:
            print(json.dumps(benchmark(name, args.steps, args.batch_size, device, Path(workdir))))


if __name__ == "__main__":
    main()
