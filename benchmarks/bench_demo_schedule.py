"""Where the demo recipe's CPU time goes, and what running its parts differently would save.

`scripts/train_demo_model.py` spends most of its time in three loops: the stage-0 LLM (700 steps),
the stage-0 encoder (1800 steps) and stage 2 (600 steps). This measures, on this machine and in one
run, each loop's seconds per step on the demo recipe's real models (random weights: a step costs
the same whatever the weights) and data:

- the encoder's stage 0 with its scenes rendered in this process or by one data loader worker;
- stage 2 (`piip-llava train --stage finetune`) with images loaded in this process or by one worker;
- the LLM's stage 0 with its decoder compiled by `torch.compile` (which needs a C++ compiler);
- the encoder's and the LLM's stage 0 on 2 threads each, on 1 thread each, and on 1 thread each
  at the same time in two processes (they do not depend on each other), with the time the recipe's
  stage 0 takes at these rates one after the other or side by side (as the recipe runs it,
  `Recipe.stage_zero_side_by_side`: the LLM takes both threads once the encoder is done).

    python benchmarks/bench_demo_schedule.py [--seconds 45] [--stage2-steps 30] [--work-dir outputs/bench_schedule]

Each measurement runs in its own process for `--seconds` after two warm-up steps, on an otherwise
idle machine (another job on the cores slows two-thread loops many times over). The report goes to
benchmarks/results/demo_schedule_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from piip_llava.file_writing import atomic_write_text

REPO = Path(__file__).resolve().parent.parent
# The recipe this measures lives beside its scripts, outside the installed package: `demo_recipe` is
# scripts/demo_recipe, importable as it is from scripts/train_demo_model.py.
sys.path.insert(0, str(REPO / "scripts"))
DEMO_VISION_CONFIG = REPO / "configs" / "demo_piip_vision.json"
WARMUP_STEPS = 2


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the small dataset and random LLM go (default: a temporary directory)")
    parser.add_argument("--seconds", type=float, default=45.0, help="how long each stage-0 measurement runs")
    parser.add_argument("--stage2-steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "demo_schedule_cpu.md",
                        help="where the markdown report goes (it is printed too)")
    parser.add_argument("--role", choices=("encoder", "llm"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--data-workers", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--llm-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def timed_steps(batches, step, seconds: float) -> dict:
    """Run `step(batch)` over `batches` for `seconds` after the warm-up steps; seconds per step."""
    iterator = iter(batches)
    for _ in range(WARMUP_STEPS):
        step(next(iterator))
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step(next(iterator))
        steps += 1
    return {"steps": steps, "seconds_per_step": (time.perf_counter() - start) / steps}


def run_role(args: argparse.Namespace) -> dict:
    """One stage-0 loop as the recipe runs it (its batches, model, loss and AdamW), timed."""
    import torch
    from demo_recipe.pipeline import Recipe
    from demo_recipe.pretraining import (
        CellAttributeEmbedding,
        CellTokenConversations,
        EncoderBatches,
        EncoderPretraining,
        LanguageBatches,
        LanguagePretraining,
        SceneAttributeHeads,
        attribute_loss,
        encoder_to_pretrain,
        language_model_to_pretrain,
        length_grouped_loss,
        step_batches,
    )

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    recipe = Recipe()
    many_steps = 100_000
    if args.role == "encoder":
        from piip_llava import PIIPImageProcessor, PIIPVisionConfig

        settings = EncoderPretraining(steps=many_steps, antialias=recipe.projector_antialias,
                                      corner_texts=recipe.encoder_corner_texts)
        if args.data_workers is not None:
            settings = replace(settings, data_workers=args.data_workers)
        config = PIIPVisionConfig(**json.loads(DEMO_VISION_CONFIG.read_text()))
        encoder = encoder_to_pretrain(config)
        heads = SceneAttributeHeads(config.branch_output_widths, settings.antialias)
        parameters = [*encoder.parameters(), *heads.parameters()]
        batches = step_batches(EncoderBatches(settings, PIIPImageProcessor(size=config.image_size), config.image_size),
                               settings.steps, settings.data_workers)

        def loss_of(batch):
            pixel_values, targets = batch
            return attribute_loss(heads(encoder(pixel_values).feature_maps), targets)
    else:
        from transformers import AutoTokenizer

        settings = LanguagePretraining(steps=many_steps, look_alike_text_rate=recipe.look_alike_text_rate,
                                       digit_place_codes=recipe.digit_place_codes,
                                       bf16=recipe.bf16 and recipe.language_pretraining_bf16)
        if args.data_workers is not None:
            settings = replace(settings, data_workers=args.data_workers)
        tokenizer = AutoTokenizer.from_pretrained(args.llm_dir)
        model = language_model_to_pretrain(args.llm_dir, settings)
        cell_embedding = CellAttributeEmbedding(tokenizer, model.get_input_embeddings(), settings.digit_place_codes)
        if args.compile:
            # The decoder stack (embeddings in, hidden states out) compiled by inductor; lengths vary by step.
            model.model.compile(dynamic=True)
        conversations = CellTokenConversations(tokenizer, settings.max_length, settings.question_loss)
        parameters = [*model.parameters(), *cell_embedding.parameters()]
        batches = step_batches(LanguageBatches(conversations, settings), settings.steps, settings.data_workers)

        def loss_of(batch):
            return length_grouped_loss(model, cell_embedding, conversations, batch, settings)

    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    # The recipe's precision: the LLM's stage 0 as `LanguagePretraining.bf16` says (set from the recipe above),
    # the encoder's in float32.
    bf16 = args.role == "llm" and settings.bf16

    def step(batch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()

    return {"role": args.role, "threads": args.threads, "data_workers": settings.data_workers, "compile": args.compile,
            **timed_steps(batches, step, args.seconds)}


def role_command(role: str, threads: int, seconds: float, llm_dir: Path, data_workers: int | None = None,
                 compile_model: bool = False) -> list[str]:
    """The command measuring one stage-0 loop; `data_workers` None keeps the recipe's own."""
    workers = [] if data_workers is None else ["--data-workers", str(data_workers)]
    return [sys.executable, __file__, "--role", role, "--threads", str(threads), "--seconds", str(seconds),
            "--llm-dir", str(llm_dir), *workers, *(["--compile"] if compile_model else [])]


def measure_roles(commands: list[list[str]], threads: int) -> list[dict]:
    """Start the commands together and collect each one's JSON line."""
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environment) for command in commands]
    results = []
    for process in processes:
        output, _ = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(process.args)} failed with exit status {process.returncode}.")
        results.append(json.loads(output.strip().splitlines()[-1]))
    return results


def measure_stage2(work_dir: Path, data_dir: Path, llm_dir: Path, steps: int, data_workers: int) -> float:
    """Seconds per stage-2 step of `piip-llava train --stage finetune` (the trainer's own train_runtime)."""
    from demo_recipe.pipeline import Recipe, run_cli, stage2_records

    recipe = Recipe()
    init_dir = work_dir / "init"
    if not (init_dir / "config.json").exists():
        run_cli("train", "init", "--llm", str(llm_dir), "--vision-config", str(DEMO_VISION_CONFIG), "--out",
                str(init_dir), "--projector-grid", str(recipe.projector_grid), "--projector-antialias",
                threads=recipe.threads)
    output_dir = work_dir / f"stage2_workers{data_workers}"
    run_cli("train", "--stage", "finetune", "--model", str(init_dir), "--data", str(stage2_records(data_dir, recipe)),
            "--image-folder", str(data_dir / "images"), "--output-dir", str(output_dir), "--use-cpu",
            "--max-steps", str(steps), "--per-device-batch-size", str(recipe.batch_size),
            "--global-batch-size", str(recipe.batch_size), "--learning-rate", str(recipe.finetune_lr),
            "--freeze-vision-branches", "--freeze-vision-tower", "--logging-steps", "10", "--save-steps", "100000",
            "--dataloader-workers", str(data_workers), *(["--scan-data"] if data_workers else []),
            *(["--bf16"] if recipe.bf16 else []), threads=recipe.threads)
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    runtime = next(entry["train_runtime"] for entry in history if "train_runtime" in entry)
    return runtime / steps


def side_by_side_minutes(steps: tuple[int, int], shared: tuple[float, float], alone: tuple[float, float]) -> float:
    """Minutes for two loops run side by side (`shared` seconds per step each) until one ends, the other then
    running its remaining steps alone on both cores (`alone` seconds per step)."""
    together = min(count * seconds for count, seconds in zip(steps, shared))
    remaining = sum((count - together / seconds) * rate for count, seconds, rate in zip(steps, shared, alone))
    return (together + remaining) / 60


def minutes_saved(minutes: float) -> str:
    return f"{minutes:.1f} min saved" if minutes >= 0 else f"{-minutes:.1f} min lost"


def machine_line(load_at_start: tuple[float, ...]) -> str:
    import platform

    import torch
    from demo_recipe.pipeline import Recipe

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    recipe = Recipe()
    llm_precision = ("bf16 with its attention kernel in float32" if recipe.bf16 and recipe.language_pretraining_bf16
                     else "float32")
    return (f"Machine: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}; the encoder's stage 0 in float32, the "
            f"LLM's stage 0 in {llm_precision}, stage 2 in {'bf16' if recipe.bf16 else 'float32'}, as the recipe "
            f"runs them here; load average at start "
            f"{', '.join(f'{load:.2f}' for load in load_at_start)}. Seconds per step after {WARMUP_STEPS} warm-up steps.")


def main(argv=None) -> int:
    args = parse_arguments(argv)
    if args.role:
        print(json.dumps(run_role(args)))
        return 0
    from demo_recipe.pipeline import Recipe, build_llm, export_data

    recipe = Recipe()
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as temporary:
        work_dir = (args.work_dir or Path(temporary)).resolve()
        small = Recipe(train_images=max(64, args.stage2_steps * recipe.batch_size // 4), eval_images=0)
        data_dir = export_data(work_dir / "data", small)
        llm_dir = build_llm(work_dir / "llm_random", data_dir, recipe)
        seconds = args.seconds

        def alone(role: str, threads: int, data_workers: int | None = None, compile_model: bool = False) -> dict:
            command = role_command(role, threads, seconds, llm_dir, data_workers, compile_model)
            return measure_roles([command], threads)[0]

        encoder_in_process = alone("encoder", 2, data_workers=0)
        encoder_worker = alone("encoder", 2, data_workers=1)
        llm_two = alone("llm", 2)
        llm_compiled = alone("llm", 2, compile_model=True)
        # Side by side, as the recipe runs it: each loop in its own process with its recipe's data loading.
        encoder_one, llm_one = alone("encoder", 1), alone("llm", 1)
        encoder_shared, llm_shared = measure_roles(
            [role_command("encoder", 1, seconds, llm_dir), role_command("llm", 1, seconds, llm_dir)], threads=1)
        stage2_in_process = measure_stage2(work_dir, data_dir, llm_dir, args.stage2_steps, data_workers=0)
        stage2_worker = measure_stage2(work_dir, data_dir, llm_dir, args.stage2_steps, data_workers=1)

    rows = [
        ("encoder stage 0, scenes rendered in the training process, 2 threads", encoder_in_process),
        ("encoder stage 0, scenes rendered by 1 data loader worker, 2 threads", encoder_worker),
        ("encoder stage 0, 1 thread, alone", encoder_one),
        ("encoder stage 0, 1 thread, beside the LLM's", encoder_shared),
        ("LLM stage 0, 2 threads", llm_two),
        ("LLM stage 0, 2 threads, decoder compiled (torch.compile, after its warm-up steps)", llm_compiled),
        ("LLM stage 0, 1 thread, alone", llm_one),
        ("LLM stage 0, 1 thread, beside the encoder's", llm_shared),
    ]
    lines = [machine_line(load_at_start), "", "| loop | steps timed | seconds per step |", "|---|---:|---:|"]
    lines += [f"| {label} | {result['steps']} | {result['seconds_per_step']:.3f} |" for label, result in rows]
    lines += [f"| stage 2, images loaded in the training process | {args.stage2_steps} | {stage2_in_process:.3f} |",
              f"| stage 2, images loaded by 1 data loader worker | {args.stage2_steps} | {stage2_worker:.3f} |", ""]

    encoder_steps, llm_steps = recipe.encoder_pretraining_steps, recipe.language_pretraining_steps
    one_after_other = (encoder_steps * encoder_in_process["seconds_per_step"]
                       + llm_steps * llm_two["seconds_per_step"]) / 60
    side_by_side = side_by_side_minutes(
        (encoder_steps, llm_steps), (encoder_shared["seconds_per_step"], llm_shared["seconds_per_step"]),
        (encoder_in_process["seconds_per_step"], llm_two["seconds_per_step"]))
    stage2_steps = math.ceil(recipe.train_images * recipe.finetune_epochs / recipe.batch_size)
    encoder_saving = encoder_steps * (encoder_in_process["seconds_per_step"] - encoder_worker["seconds_per_step"]) / 60
    stage2_saving = stage2_steps * (stage2_in_process - stage2_worker) / 60
    lines += [
        (f"- The recipe's stage 0 ({encoder_steps} encoder + {llm_steps} LLM steps) at these rates: "
         f"{one_after_other:.1f} min one after the other, {side_by_side:.1f} min side by side."),
        (f"- Encoder stage 0 with a data loader worker: "
         f"{encoder_in_process['seconds_per_step'] / encoder_worker['seconds_per_step']:.2f}x the steps/s "
         f"({minutes_saved(encoder_saving)} over {encoder_steps} steps)."),
        (f"- Stage 2 with a data loader worker: {stage2_in_process / stage2_worker:.2f}x the steps/s "
         f"({minutes_saved(stage2_saving)} over {stage2_steps} steps)."),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        atomic_write_text(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
