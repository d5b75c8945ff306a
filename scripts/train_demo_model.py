#!/usr/bin/env python
"""Train the bundled demo PIIP-LLaVA from nothing, on the CPU, with the project's own pipeline.

No pretrained weights can be downloaded here, so the default model of `piip-llava chat` is one we
train ourselves on the synthetic shapes-and-text dataset: a two-branch PIIP encoder (a wider ViT at
64 px and a narrow ConvNeXt at 256 px), a small LLaMA-style LLM and a tokenizer trained on the
dataset's texts, taken through stage 1 (projector only, `plain` captions) and stage 2 (everything,
`vicuna_v1` conversations) by `piip-llava train`, then scored by `piip-llava eval` on held-out
TextVQA-format and MMBench-format splits.

Every step writes into --work-dir and is skipped when its output is already there, and the
training stages resume from their last checkpoint, so an interrupted run continues where it
stopped. `--install` copies the result into piip_llava/assets/demo_model (the package default).

    python scripts/train_demo_model.py --work-dir outputs/demo --install
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_VISION_CONFIG = REPO / "configs" / "demo_piip_vision.json"
INSTALL_DIR = REPO / "piip_llava" / "assets" / "demo_model"
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "chat_template.jinja",
    "tokenizer.json",
    "tokenizer_config.json",
)

# The LLM: small enough to train from scratch on 2 cores in minutes.
DEMO_LLM = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="outputs/demo", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=2400)
    parser.add_argument("--eval-images", type=int, default=150)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--pretrain-epochs", type=float, default=1.0)
    parser.add_argument("--finetune-epochs", type=float, default=4.0)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--install", action="store_true", help="copy the trained model into the package")
    return parser.parse_args(argv)


def log(message: str) -> None:
    sys.stderr.write(f"[demo {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def run_cli(*arguments: str, threads: int) -> None:
    """Run `piip-llava ...` in a child process, as a user would."""
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "piip_llava", *arguments]
    log("$ piip-llava " + " ".join(arguments))
    subprocess.run(command, check=True, env=environment, cwd=REPO)


def export_data(work_dir: Path, args) -> Path:
    from piip_llava.synthetic.export import export_dataset

    data_dir = work_dir / "data"
    if not (data_dir / "stats.json").exists():
        export_dataset(data_dir, seed=args.seed, num_train_images=args.train_images, num_eval_images=args.eval_images)
    return data_dir


def build_llm(work_dir: Path, data_dir: Path, args) -> Path:
    """A randomly initialised LLaMA-style LLM with a tokenizer trained on the dataset's texts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from piip_llava.synthetic.export import tokenizer_corpus
    from piip_llava.tokenizer_training import train_llama_style_tokenizer

    llm_dir = work_dir / "llm"
    if (llm_dir / "config.json").exists():
        return llm_dir
    tokenizer = train_llama_style_tokenizer(tokenizer_corpus(data_dir), vocab_size=args.vocab_size)
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **DEMO_LLM,
    )
    LlamaForCausalLM(config).save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    return llm_dir


def train(work_dir: Path, data_dir: Path, llm_dir: Path, args) -> Path:
    init_dir, stage1_dir, stage2_dir = work_dir / "init", work_dir / "stage1", work_dir / "stage2"
    common = ["--use-cpu", "--seed", str(args.seed), "--per-device-batch-size", str(args.batch_size),
              "--global-batch-size", str(args.batch_size), "--image-folder", str(data_dir / "images"), "--logging-steps", "10",
              "--save-steps", "100", "--save-total-limit", "1", "--resume"]
    if not (init_dir / "config.json").exists():
        run_cli("train", "init", "--llm", str(llm_dir), "--vision-config", str(DEMO_VISION_CONFIG),
                "--out", str(init_dir), threads=args.threads)
    if not (stage1_dir / "model.safetensors").exists():
        run_cli("train", "--stage", "pretrain", "--model", str(init_dir), "--data", str(data_dir / "pretrain.json"),
                "--output-dir", str(stage1_dir), "--epochs", str(args.pretrain_epochs),
                "--learning-rate", str(args.pretrain_lr), "--warmup-ratio", "0.03", *common, threads=args.threads)
    if not (stage2_dir / "model.safetensors").exists():
        run_cli("train", "--stage", "finetune", "--model", str(stage1_dir), "--data", str(data_dir / "finetune.json"),
                "--output-dir", str(stage2_dir), "--epochs", str(args.finetune_epochs),
                "--learning-rate", str(args.finetune_lr), "--warmup-ratio", "0.03", "--weight-decay", "0.0",
                *common, threads=args.threads)
    return stage2_dir


def evaluate(work_dir: Path, data_dir: Path, model_dir: Path, args) -> dict:
    """Answers and scores on the held-out splits through the evaluation harness, per question type."""
    from piip_llava.evaluation.answers_file import read_answers
    from piip_llava.evaluation.textvqa import load_annotations, score_textvqa

    eval_dir = work_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    splits = data_dir / "eval"
    run_cli("eval", "textvqa", "--model-path", str(model_dir), "--question-file",
            str(splits / "textvqa_questions.jsonl"), "--image-folder", str(data_dir / "images"),
            "--annotation-file", str(splits / "textvqa_annotations.json"),
            "--answers-file", str(eval_dir / "textvqa_answers.jsonl"),
            "--metrics-file", str(eval_dir / "textvqa_metrics.json"), "--batch-size", "16",
            "--max-new-tokens", "8", threads=args.threads)
    run_cli("eval", "mmbench", "--model-path", str(model_dir), "--question-file", str(splits / "mmbench_dev.tsv"),
            "--answers-file", str(eval_dir / "mmbench_answers.jsonl"),
            "--metrics-file", str(eval_dir / "mmbench_metrics.json"), "--batch-size", "16",
            "--max-new-tokens", "4", threads=args.threads)

    question_types = json.loads((splits / "question_types.json").read_text())
    annotations = load_annotations(splits / "textvqa_annotations.json")
    records = read_answers(eval_dir / "textvqa_answers.jsonl").records
    textvqa_by_type = {}
    for question_type in sorted(set(question_types.values())):
        subset = [record for record in records if question_types.get(str(record["question_id"])) == question_type]
        if subset:
            score = score_textvqa(subset, annotations)
            textvqa_by_type[question_type] = {"accuracy": score.accuracy, "samples": score.samples}
    stats = json.loads((data_dir / "stats.json").read_text())
    mmbench = json.loads((eval_dir / "mmbench_metrics.json").read_text())
    results = {
        "textvqa": json.loads((eval_dir / "textvqa_metrics.json").read_text()),
        "textvqa_by_type": textvqa_by_type,
        "mmbench": mmbench,
        "chance": stats.get("chance_accuracy", stats.get("chance")),
    }
    (eval_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def install(model_dir: Path) -> None:
    """Copy the trained model and processor files (no checkpoints) into the package."""
    INSTALL_DIR.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        source = model_dir / name
        if source.exists():
            shutil.copy2(source, INSTALL_DIR / name)
    size = sum(path.stat().st_size for path in INSTALL_DIR.iterdir()) / 2**20
    log(f"installed the demo model into {INSTALL_DIR} ({size:.1f} MiB)")


def main(argv=None) -> int:
    args = parse_arguments(argv)
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data_dir = export_data(work_dir, args)
    llm_dir = build_llm(work_dir, data_dir, args)
    model_dir = train(work_dir, data_dir, llm_dir, args)
    log(f"training done in {(time.time() - started) / 60:.1f} min (steps already done were skipped)")
    results = evaluate(work_dir, data_dir, model_dir, args)
    log(json.dumps({"textvqa_by_type": results["textvqa_by_type"]}, indent=1))
    if args.install:
        install(model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
