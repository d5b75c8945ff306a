"""Train and score a small PIIP-LLaVA on the synthetic dataset, end to end, with the project's own tools.

Used by `scripts/train_demo_model.py` (the bundled demo model) and `scripts/piip_experiment.py`
(PIIP against single-branch baselines): stage 0 pretrains the encoder and the LLM on the synthetic
data (`pretraining.py`), then the usual two stages run. Each step writes into a work directory and is skipped
when its output already exists; the training stages resume from their last checkpoint, so a run
that was stopped continues where it left off. Training and evaluation go through the
`piip-llava train` / `piip-llava eval` commands in child processes, exactly as a user runs them.
"""

from __future__ import annotations

import argparse
import json
import logging as standard_logging
import multiprocessing
import os
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers.utils import logging

from piip_llava.file_writing import atomic_write_text
from piip_llava.training import cpu_has_native_bf16

logger = logging.get_logger(__name__)

# The LLM: small enough to train from scratch on 2 CPU cores.
SMALL_LLM = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


@dataclass
class Recipe:
    """How every model of a comparison is trained: the same data, LLM, schedule and seed."""

    seed: int = 0
    train_images: int = 2400
    eval_images: int = 150
    vocab_size: int = 640
    pretrain_epochs: float = 2.0
    # 4 stage-2 epochs of conversations of up to 6 questions and a listing turn (`finetune_items`).
    finetune_epochs: float = 4.0
    pretrain_lr: float = 2e-3
    finetune_lr: float = 1e-3
    batch_size: int = 16
    encoder_pretraining_steps: int = 1800
    # The encoder's stage-0 scenes carry a text in every corner (`EncoderPretraining.corner_texts`).
    encoder_corner_texts: bool = True
    language_pretraining_steps: int = 700
    # Share of the stage-0 LLM's question conversations that show the text blurred with a look-alike and
    # ask about it as multiple choice only (`LanguagePretraining.look_alike_text_rate`); docs/training.md has
    # what it changed.
    look_alike_text_rate: float = 0.2
    # Digits get place codes in the stage-0 LLM's cell tokens (`LanguagePretraining.digit_place_codes`).
    digit_place_codes: bool = True
    # Stage 2 keeps the whole pretrained encoder fixed, as LLaVA-1.5 keeps its CLIP, so the encoder runs
    # without a backward graph; the LLM on multi-turn prompts dominates a step either way. Without it,
    # `freeze_vision_branches` keeps only the backbones fixed.
    freeze_vision_tower: bool = True
    freeze_vision_branches: bool = True
    # Add every caption to stage 2 as a "describe the image" turn (see `write_instruction_mix`).
    describe_turns: bool = False
    # Train stage 2 on the "what is written" questions too; off, for encoders that cannot read (see
    # `write_questions_without_text`).
    text_questions: bool = True
    # Extra single-turn stage-2 records per training image whose text is a number: its text question asked as
    # multiple choice with fresh options (see `write_number_choice_records`); off by default, as it did not
    # teach numbers (docs/training.md).
    number_choice_records: int = 0
    # Image tokens per side (0: the encoder's own grid). A scene is a 3x3 grid of cells, so 3 gives one
    # token per cell and the LLM looks among 9 tokens instead of 64, which it learns to use far sooner.
    projector_grid: int = 3
    # Each image token averages its cell of the encoder's maps (`resize_to_grid` with antialias) instead of
    # reading the map at the cell's centre, in the projector and in the encoder's stage-0 heads alike. An
    # 8x8 map read at 3 points leaves most of each cell unread, and the text sits anywhere in its corner cell.
    projector_antialias: bool = True
    # bfloat16 autocast in the stage-0 LLM and stages 1 and 2 (`piip-llava train --bf16`); weights stay float32.
    # On by default only where the CPU has hardware bfloat16 (`cpu_has_native_bf16`): elsewhere it is emulated
    # and many times slower. The encoder's stage 0 stays float32 (in bf16 it read worse). In the stage-0 LLM the
    # attention kernel stays float32 (`float32_sdpa_attention`): with it in bf16 too, the LLM did not learn its
    # lookups (docs/training.md).
    bf16: bool = field(default_factory=cpu_has_native_bf16)
    # Whether `bf16` covers the stage-0 LLM.
    language_pretraining_bf16: bool = True
    # The stage-0 LLM's peak learning rate (`LanguagePretraining.learning_rate`): the highest at which it learnt
    # every lookup in bf16 (docs/training.md).
    language_pretraining_lr: float = 1.5e-3
    # Train the stage-0 encoder in a child process on half the threads while the stage-0 LLM trains on the rest,
    # the LLM taking every thread once the encoder is done (`pretrain_stage_zero`): neither uses 2 cores fully,
    # so side by side they finish sooner than one after the other.
    stage_zero_side_by_side: bool = True
    threads: int = field(default_factory=lambda: os.cpu_count() or 2)


    @classmethod
    def add_arguments(cls, parser) -> None:
        """One `--option` per recipe field, so every script that trains with a recipe exposes the same knobs."""
        for name, value in vars(cls()).items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
            else:
                parser.add_argument(flag, type=type(value), default=value)

    @classmethod
    def from_arguments(cls, args) -> Recipe:
        return cls(**{name: getattr(args, name) for name in vars(cls())})


def log(message: str) -> None:
    logger.info(message)


def configure_script_logging() -> None:
    """The training scripts' log: every line stamped with the time, so the log gives each step's duration."""
    standard_logging.basicConfig(level=standard_logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")


def run_cli(*arguments: str, threads: int) -> None:
    """Run `piip-llava ...` in a child process, as a user would."""
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    log("$ piip-llava " + " ".join(arguments))
    subprocess.run([sys.executable, "-m", "piip_llava", *arguments], check=True, env=environment)


def export_data(data_dir: Path, recipe: Recipe) -> Path:
    from piip_llava.synthetic import export_dataset

    if not (data_dir / "stats.json").exists():
        export_dataset(data_dir, seed=recipe.seed, num_train_images=recipe.train_images,
                       num_eval_images=recipe.eval_images)
    return data_dir


def write_records(path: Path, records: list[dict]) -> Path:
    """Write stage-2 records through a temporary sibling, so a records file that exists is always complete."""
    atomic_write_text(path, json.dumps(records))
    return path


DESCRIBE_PROMPT = "Describe the image briefly."


def write_instruction_mix(data_dir: Path) -> Path:
    """Stage-2 records: the question/answer conversations plus every caption as a "describe" turn.

    A model trained from scratch gets little signal from one-word answers alone; a caption names
    every shape, colour, position and the text, so it teaches the encoder and the LLM to use the
    image much faster (LLaVA's instruction mix likewise keeps detailed descriptions).
    """
    mix_path = data_dir / "finetune_mix.json"
    if mix_path.exists():
        return mix_path
    questions = json.loads((data_dir / "finetune.json").read_text(encoding="utf-8"))
    captions = json.loads((data_dir / "pretrain.json").read_text(encoding="utf-8"))
    descriptions = [
        {
            "id": f"{record['id']}_describe",
            "image": record["image"],
            "conversations": [
                {"from": "human", "value": "<image>\n" + DESCRIBE_PROMPT},
                {"from": "gpt", "value": record["conversations"][1]["value"]},
            ],
        }
        for record in captions
    ]
    return write_records(mix_path, questions + descriptions)


TEXT_QUESTION_MARK = "is written in the image"


def write_questions_without_text(data_dir: Path) -> Path:
    """Stage-2 records without the "what is written" turns; records left with no turn are dropped.

    For an encoder that cannot read (a ConvNeXt or ViT stage-0 encoder, whose word and digit heads
    stayed at chance within the CPU budget) those turns' answers cannot be predicted from the image;
    they made up most of the answer tokens and kept stage 2 from starting to use the image at all.
    The image placeholder moves to the first remaining question.
    """
    subset_path = data_dir / "finetune_without_text.json"
    if subset_path.exists():
        return subset_path
    records = []
    for record in json.loads((data_dir / "finetune.json").read_text(encoding="utf-8")):
        turns = record["conversations"]
        pairs = [(turns[index], turns[index + 1]) for index in range(0, len(turns) - 1, 2)]
        kept = [(human, gpt) for human, gpt in pairs if TEXT_QUESTION_MARK not in human["value"]]
        if not kept:
            continue
        conversations = []
        for number, (human, gpt) in enumerate(kept):
            question = human["value"].replace("<image>\n", "")
            conversations.append({"from": "human", "value": ("<image>\n" if number == 0 else "") + question})
            conversations.append(dict(gpt))
        records.append({**record, "conversations": conversations})
    return write_records(subset_path, records)


def write_number_choice_records(data_dir: Path, per_image: int, seed: int) -> Path:
    """Stage-2 records: the question/answer conversations plus, for each image whose text is a number,
    `per_image` one-turn conversations asking its text question as multiple choice, each with options of its own.

    The demo model reads a number's first digit far better than the rest, and in the MMBench format it replied
    with a number of its own (first digit right, then a misreading) that names no option. A multiple-choice
    reply can be finished by copying the option that begins as the reading does, a copy from the prompt; each
    image's own conversation asks its text question as multiple choice only 3 times in 10. docs/training.md has
    what one record per image did.
    """
    from piip_llava.synthetic import item_rng
    from piip_llava.synthetic.questions import TEXT_QUESTION_TYPES, Question, human_turn, make_multiple_choice

    path = data_dir / f"finetune_number_choice_{per_image}.json"
    if path.exists():
        return path
    records = json.loads((data_dir / "finetune.json").read_text(encoding="utf-8"))
    extra = []
    for index, record in enumerate(records):
        turns = record["conversations"]
        for human, gpt in zip(turns[0::2], turns[1::2]):
            if TEXT_QUESTION_MARK not in human["value"] or not gpt["value"].isdigit():
                continue
            text = human["value"].replace("<image>\n", "").split("\n")[0]
            # Either text type: options keep the number's digit count, as the evaluation splits' do.
            question = Question(TEXT_QUESTION_TYPES[0], text, gpt["value"])
            for copy in range(per_image):
                choice = make_multiple_choice(question, item_rng(seed, "train", index, f"number-choice-{copy}"))
                extra.append({"id": f"{record['id']}_number_choice_{copy}", "image": record["image"],
                              "conversations": [human_turn(choice.prompt, first=True),
                                                {"from": "gpt", "value": choice.reply}]})
    return write_records(path, records + extra)


def stage2_records(data_dir: Path, recipe: Recipe) -> Path:
    """The stage-2 records file the recipe asks for, written on first use (at most one of the variations)."""
    variations = [name for name, used in (("describe_turns", recipe.describe_turns),
                                          ("leaving out text questions", not recipe.text_questions),
                                          ("number_choice_records", recipe.number_choice_records > 0)) if used]
    if len(variations) > 1:
        raise ValueError(f"{' and '.join(variations)} cannot be combined (each writes its own stage-2 records).")
    if recipe.describe_turns:
        return write_instruction_mix(data_dir)
    if recipe.number_choice_records > 0:
        return write_number_choice_records(data_dir, recipe.number_choice_records, recipe.seed)
    return data_dir / "finetune.json" if recipe.text_questions else write_questions_without_text(data_dir)


def build_llm(llm_dir: Path, data_dir: Path, recipe: Recipe) -> Path:
    """A randomly initialised LLaMA-style LLM with a tokenizer trained on the dataset's texts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from piip_llava.synthetic import tokenizer_corpus
    from piip_llava.tokenizer_training import train_llama_style_tokenizer

    if (llm_dir / "config.json").exists():
        return llm_dir
    tokenizer = train_llama_style_tokenizer(tokenizer_corpus(data_dir), vocab_size=recipe.vocab_size)
    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SMALL_LLM,
    )
    LlamaForCausalLM(config).save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    return llm_dir


def pretrain_llm(work_dir: Path, data_dir: Path, recipe: Recipe, before_step=None) -> Path:
    """The shared LLM: random weights and a tokenizer trained on the data, then language pretraining on
    cell tokens, one per cell of the scene grid (so the projector must give one image token per cell).
    `before_step()` runs before every training step (see `pretrain_stage_zero`)."""
    from .pretraining import CELL_GRID, LanguagePretraining, pretrain_language_model

    if recipe.projector_grid != CELL_GRID:
        raise ValueError(f"Language pretraining reads one token per scene cell, so projector_grid must be {CELL_GRID}, "
                         f"got {recipe.projector_grid}.")
    random_dir = build_llm(work_dir / "llm_random", data_dir, recipe)
    settings = LanguagePretraining(steps=recipe.language_pretraining_steps, seed=recipe.seed,
                                   learning_rate=recipe.language_pretraining_lr,
                                   bf16=recipe.bf16 and recipe.language_pretraining_bf16,
                                   look_alike_text_rate=recipe.look_alike_text_rate,
                                   digit_place_codes=recipe.digit_place_codes)
    return pretrain_language_model(random_dir, work_dir / "llm", settings, before_step=before_step)


def pretrain_vision_encoder(run_dir: Path, vision_config: Path, recipe: Recipe) -> Path:
    """One encoder per run, pretrained on scene attributes (see `demo_recipe.pretraining`)."""
    from .pretraining import EncoderPretraining, pretrain_encoder

    settings = EncoderPretraining(steps=recipe.encoder_pretraining_steps, seed=recipe.seed,
                                  antialias=recipe.projector_antialias, corner_texts=recipe.encoder_corner_texts)
    return pretrain_encoder(vision_config, run_dir / "encoder", settings)


def run_on_threads(target, arguments: tuple, threads: int) -> None:
    """`target(*arguments)` with the scripts' logging on `threads` threads: the body of `SideBySideProcess`'s child."""
    import torch

    configure_script_logging()
    torch.set_num_threads(threads)
    target(*arguments)


class SideBySideProcess:
    """`target(*arguments)` in a child process on half of `threads` while this process works on the other half.
    Called between units of this process's work, it gives this process every thread back once the child is done.

    The child is spawned, not forked: a fork of a process whose OpenMP threads have run can hang. A child that
    failed raises at the next call, and an error in this process stops the child.
    """

    def __init__(self, target, arguments: tuple, threads: int, name: str):
        if threads < 2:
            raise ValueError(f"Sharing the threads with a child process needs at least 2 threads, got {threads}.")
        self.name = name
        self.child_threads = threads // 2
        self.own_threads = threads - self.child_threads
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_on_threads, args=(target, arguments, self.child_threads), name=name)
        self.threads_before = None

    def __enter__(self):
        import torch

        self.threads_before = torch.get_num_threads()
        self.process.start()
        log(f"{self.name}: process {self.process.pid} on {self.child_threads} threads, this one on {self.own_threads} "
            "until it is done")
        torch.set_num_threads(self.own_threads)
        return self

    def __call__(self) -> None:
        if self.threads_before is not None and not self.process.is_alive():
            self._take_threads_back()

    def _join_and_restore_threads(self) -> int:
        import torch

        self.process.join()
        torch.set_num_threads(self.threads_before)
        self.threads_before = None
        return self.process.exitcode

    def _take_threads_back(self) -> None:
        exit_code = self._join_and_restore_threads()
        if exit_code != 0:
            raise RuntimeError(f"{self.name}: the process failed (exit code {exit_code}); its error is in the log above.")
        log(f"{self.name}: done; this process goes on with every thread")

    def __exit__(self, exception_type, exception, traceback) -> None:
        if self.threads_before is None:
            return
        if exception_type is None:
            self._take_threads_back()
        else:
            self.process.terminate()
            self._join_and_restore_threads()


def pretrain_stage_zero(work_dir: Path, data_dir: Path, run_dir: Path, vision_config: Path,
                        recipe: Recipe) -> tuple[Path, Path]:
    """Stage 0 of the LLM (`pretrain_llm`, into `work_dir`) and of the encoder (`pretrain_vision_encoder`, into
    `run_dir`); returns their directories. They need nothing of each other, so with
    `recipe.stage_zero_side_by_side` the encoder trains in a child process beside the LLM (`SideBySideProcess`,
    the LLM taking every thread once the encoder is done); one that is already finished is skipped, the other
    then trains alone on every thread."""
    from .pretraining import is_pretrained

    llm_dir, encoder_dir = work_dir / "llm", run_dir / "encoder"
    if (recipe.stage_zero_side_by_side and recipe.threads >= 2 and not is_pretrained(llm_dir)
            and not is_pretrained(encoder_dir)):
        with SideBySideProcess(pretrain_vision_encoder, (run_dir, vision_config, recipe), recipe.threads,
                               "stage-0 encoder") as encoder_beside:
            return pretrain_llm(work_dir, data_dir, recipe, before_step=encoder_beside), encoder_dir
    return pretrain_llm(work_dir, data_dir, recipe), pretrain_vision_encoder(run_dir, vision_config, recipe)


def train_two_stages(
    run_dir: Path,
    vision_model: Path,
    data_dir: Path,
    llm_dir: Path,
    recipe: Recipe,
) -> Path:
    """`train init` from the pretrained encoder and LLM, stage 1 (projector, plain captions), stage 2
    (everything, vicuna_v1); returns stage 2's directory."""
    init_dir, stage1_dir, stage2_dir = run_dir / "init", run_dir / "stage1", run_dir / "stage2"
    common = [
        "--use-cpu", "--seed", str(recipe.seed), "--per-device-batch-size", str(recipe.batch_size),
        "--global-batch-size", str(recipe.batch_size), "--image-folder", str(data_dir / "images"),
        "--logging-steps", "10", "--save-steps", "100", "--save-total-limit", "1", "--resume",
        *(["--bf16"] if recipe.bf16 else []),
    ]
    if not (init_dir / "config.json").exists():
        grid = ["--projector-grid", str(recipe.projector_grid)] if recipe.projector_grid else []
        antialias = ["--projector-antialias"] if recipe.projector_antialias else []
        run_cli("train", "init", "--llm", str(llm_dir), "--vision-model", str(vision_model), "--out", str(init_dir),
                *grid, *antialias, threads=recipe.threads)
    if not (stage1_dir / "model.safetensors").exists():
        run_cli("train", "--stage", "pretrain", "--model", str(init_dir), "--data", str(data_dir / "pretrain.json"),
                "--output-dir", str(stage1_dir), "--epochs", str(recipe.pretrain_epochs),
                "--learning-rate", str(recipe.pretrain_lr), "--warmup-ratio", "0.03", *common, threads=recipe.threads)
    if not (stage2_dir / "model.safetensors").exists():
        stage2_data = stage2_records(data_dir, recipe)
        run_cli("train", "--stage", "finetune", "--model", str(stage1_dir), "--data", str(stage2_data),
                "--output-dir", str(stage2_dir), "--epochs", str(recipe.finetune_epochs),
                "--learning-rate", str(recipe.finetune_lr), "--warmup-ratio", "0.03", "--weight-decay", "0.0",
                *(["--freeze-vision-branches"] if recipe.freeze_vision_branches else []),
                *(["--freeze-vision-tower"] if recipe.freeze_vision_tower else []), *common,
                threads=recipe.threads)
    return stage2_dir


def evaluate(eval_dir: Path, data_dir: Path, model_dir: Path, recipe: Recipe, by_likelihood: bool = True) -> dict:
    """Answers and scores on the held-out splits through the evaluation harness, per question type.

    Returns and writes (`results.json`) the TextVQA-format accuracy per question type, the
    MMBench-format vanilla and circular accuracy per category, answered by generation (MMBench's
    protocol) and, unless `by_likelihood` is off, by likelihood (`piip_llava.evaluation.likelihood`: every
    option of every round is scored, the costliest part), and chance levels. Each benchmark resumes from
    its answers file, so a finished evaluation only scores again.
    """
    from piip_llava.evaluation.answers_file import read_answers
    from piip_llava.evaluation.textvqa import load_annotations, score_textvqa

    results_file = eval_dir / "results.json"
    eval_dir.mkdir(parents=True, exist_ok=True)
    splits = data_dir / "eval"
    run_cli("eval", "textvqa", "--model-path", str(model_dir), "--question-file",
            str(splits / "textvqa_questions.jsonl"), "--image-folder", str(data_dir / "images"),
            "--annotation-file", str(splits / "textvqa_annotations.json"),
            "--answers-file", str(eval_dir / "textvqa_answers.jsonl"),
            "--metrics-file", str(eval_dir / "textvqa_metrics.json"), "--batch-size", "16",
            "--max-new-tokens", "8", threads=recipe.threads)
    run_cli("eval", "mmbench", "--model-path", str(model_dir), "--question-file", str(splits / "mmbench_dev.tsv"),
            "--answers-file", str(eval_dir / "mmbench_answers.jsonl"),
            "--metrics-file", str(eval_dir / "mmbench_metrics.json"), "--batch-size", "16",
            "--max-new-tokens", "10", threads=recipe.threads)
    likelihood_metrics = eval_dir / "mmbench_likelihood_metrics.json"
    if by_likelihood:
        run_cli("eval", "mmbench", "--model-path", str(model_dir), "--question-file", str(splits / "mmbench_dev.tsv"),
                "--answers-file", str(eval_dir / "mmbench_likelihood_answers.jsonl"),
                "--metrics-file", str(likelihood_metrics), "--batch-size", "16", "--answer-by", "likelihood",
                threads=recipe.threads)

    question_types = json.loads((splits / "question_types.json").read_text())
    annotations = load_annotations(splits / "textvqa_annotations.json")
    records = read_answers(eval_dir / "textvqa_answers.jsonl").records
    by_type = {}
    for question_type in sorted(set(question_types.values())):
        subset = [record for record in records if question_types.get(str(record["question_id"])) == question_type]
        if subset:
            score = score_textvqa(subset, annotations)
            by_type[question_type] = {"accuracy": score.accuracy, "samples": score.samples}
    stats = json.loads((data_dir / "stats.json").read_text())
    results = {
        "textvqa": json.loads((eval_dir / "textvqa_metrics.json").read_text()),
        "textvqa_by_type": by_type,
        "mmbench": json.loads((eval_dir / "mmbench_metrics.json").read_text()),
        **({"mmbench_likelihood": json.loads(likelihood_metrics.read_text())} if by_likelihood else {}),
        "text_by_kind": text_scores_by_kind(eval_dir, splits, by_likelihood),
        "chance": stats.get("chance_accuracy"),
    }
    atomic_write_text(results_file, json.dumps(results, indent=2) + "\n")
    return results


TEXT_KINDS = ("words", "numbers")


def text_kind(written: str) -> str:
    return "numbers" if written.isdigit() else "words"


def textvqa_scores_by_kind(answers_file: Path, splits: Path) -> dict:
    """{text type: {kind: TextVQA-format accuracy and samples}} for the text questions of an answers file."""
    from piip_llava.evaluation.answers_file import read_answers
    from piip_llava.evaluation.textvqa import load_annotations, score_textvqa
    from piip_llava.synthetic.questions import TEXT_QUESTION_TYPES

    question_types = json.loads((splits / "question_types.json").read_text())
    annotations = load_annotations(splits / "textvqa_annotations.json")
    written = {image_id: answers[0] for (image_id, _), answers in annotations.items()}
    grouped = {}
    for record in read_answers(answers_file).records:
        question_type = question_types.get(str(record["question_id"]))
        if question_type in TEXT_QUESTION_TYPES:
            grouped.setdefault(question_type, {}).setdefault(text_kind(written[record["question_id"]]), []).append(record)
    scores = {}
    for question_type, by_kind in sorted(grouped.items()):
        for kind, records in sorted(by_kind.items()):
            score = score_textvqa(records, annotations)
            scores.setdefault(question_type, {})[kind] = {"accuracy": score.accuracy, "samples": score.samples}
    return scores


def mmbench_text_items_by_kind(splits: Path) -> dict:
    """{text type: {kind: every round of its MMBench-format questions}}, the kind told by the right option."""
    from piip_llava.evaluation.mmbench import OPTION_LETTERS, load_mmbench_items, read_mmbench_table
    from piip_llava.synthetic.questions import TEXT_QUESTION_TYPES

    items, _ = load_mmbench_items(read_mmbench_table(splits / "mmbench_dev.tsv"))
    grouped = {}
    for item in items:
        if item.category in TEXT_QUESTION_TYPES:
            right_option = item.options[OPTION_LETTERS.index(item.answer)]
            grouped.setdefault(item.category, {}).setdefault(text_kind(right_option), []).append(item)
    return grouped


def mmbench_scores_by_kind(answers_file: Path, items_by_kind: dict) -> dict:
    """{text type: {kind: vanilla and circular accuracy, replies naming no option, questions}} of an answers file."""
    from piip_llava.evaluation.answers_file import read_answers
    from piip_llava.evaluation.mmbench import match_records, score_mmbench

    records = read_answers(answers_file).records
    scores = {}
    for category, by_kind in sorted(items_by_kind.items()):
        for kind, items in sorted(by_kind.items()):
            # The subset's own answers, matched as the scorer matches them (the other questions' are not scored).
            answers, _ = match_records(records, items)
            tallies = score_mmbench(answers.values(), items).per_category[category]
            scores.setdefault(category, {})[kind] = {
                "vanilla_accuracy": tallies["vanilla"].accuracy, "circular_accuracy": tallies["circular"].accuracy,
                "vanilla_no_option_percent": tallies["no_option"].accuracy, "questions": tallies["circular"].total}
    return scores


def text_scores_by_kind(eval_dir: Path, splits: Path, by_likelihood: bool = True) -> dict:
    """The text questions' scores split by what is written, a word or a number, per text size, from the answers
    files `evaluate` wrote, by the harness's own scorers: {"textvqa", "mmbench" and "mmbench_likelihood": {text type:
    {kind: scores}}}.

    Both are spelt piece by piece from one image token, but a word was one class of the stage-0 cell tokens and
    a number, before, one "number" class and its digits by place. The per-type scores alone hid that the demo
    model read words and not numbers.
    """
    items_by_kind = mmbench_text_items_by_kind(splits)
    scores = {"textvqa": textvqa_scores_by_kind(eval_dir / "textvqa_answers.jsonl", splits),
              "mmbench": mmbench_scores_by_kind(eval_dir / "mmbench_answers.jsonl", items_by_kind)}
    if by_likelihood:
        scores["mmbench_likelihood"] = mmbench_scores_by_kind(eval_dir / "mmbench_likelihood_answers.jsonl",
                                                              items_by_kind)
    return scores


def evaluate_on_larger_split(work_dir: Path, eval_dir: Path, model_dir: Path, recipe: Recipe,
                             images: int, by_likelihood: bool = True) -> tuple[dict, dict]:
    """`evaluate` on a held-out split of `images` images, and that split's stats.

    The split is written once under `work_dir/large_check/data`, seeded like the run's own (so it begins
    with the same images), and shared by every model scored in that work directory.
    """
    data_dir = export_data(work_dir / "large_check" / "data", replace(recipe, train_images=0, eval_images=images))
    stats = json.loads((data_dir / "stats.json").read_text())
    if stats["eval"]["images"] != images:
        raise ValueError(f"{data_dir} holds a {stats['eval']['images']}-image split, not {images}; "
                         "remove it or ask for that size.")
    return evaluate(eval_dir, data_dir, model_dir, recipe, by_likelihood), stats
