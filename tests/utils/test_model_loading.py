"""The model-loading helper chat and eval share: bad model directories, devices and weights get one clear error."""

from __future__ import annotations

import json
import shutil

import pytest

from piip_llava.cli import main
from piip_llava.model_loading import ModelLoadingError, load_model_and_processor


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


@pytest.fixture
def image_file(tmp_path, rgb_image):
    path = tmp_path / "image.png"
    rgb_image.save(path)
    return path


def set_text_layers(model_dir, layers: int) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = layers
    (model_dir / "config.json").write_text(json.dumps(config))


def test_a_missing_model_path_is_named_in_chat_and_eval(tmp_path, image_file, capsys):
    missing = tmp_path / "no" / "such-model"
    assert main(["chat", "--model", str(missing), "--image", str(image_file), "--prompt", "Hi"]) == 1
    assert f"no such model directory: {missing}" in capsys.readouterr().err
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "image": image_file.name, "text": "What?"}) + "\n")
    status = main(["eval", "textvqa", "--model-path", str(missing), "--question-file", str(questions),
                   "--image-folder", str(tmp_path), "--answers-file", str(tmp_path / "answers.jsonl")])
    assert status == 2
    error = capsys.readouterr().err
    assert f"no such model directory: {missing}" in error and "Repo id" not in error


def test_a_directory_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadingError, match="is not a model directory: it has no config.json"):
        load_model_and_processor(tmp_path, device="cpu")


def test_a_truncated_weight_file_is_reported_as_such(model_copy, image_file, capsys):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadingError, match="cannot read the weights in .*truncated or corrupt"):
        load_model_and_processor(model_copy, device="cpu")
    assert main(["chat", "--model", str(model_copy), "--image", str(image_file), "--prompt", "Hi"]) == 1
    assert "cannot read the weights" in capsys.readouterr().err


def test_a_device_this_machine_lacks_is_refused_before_loading(tiny_model_dir, image_file, capsys):
    # cuda:99 exists nowhere: without CUDA the message says CUDA is missing, with it that the index is.
    with pytest.raises(ModelLoadingError, match="device cuda:99 asked for, but"):
        load_model_and_processor(tiny_model_dir, device="cuda:99")
    status = main(["chat", "--model", str(tiny_model_dir), "--image", str(image_file), "--prompt", "Hi",
                   "--device", "cuda:99"])
    assert status == 1
    error = capsys.readouterr().err
    assert "device cuda:99 asked for" in error and "Traceback" not in error
    with pytest.raises(ModelLoadingError, match="'gpu0' is not a torch device"):
        load_model_and_processor(tiny_model_dir, device="gpu0")


@pytest.mark.parametrize("layers, problem", [(3, "have no saved weight"), (1, "belong to no parameter")])
def test_a_config_that_does_not_match_its_weights_is_refused(layers, problem, model_copy, image_file, capsys):
    set_text_layers(model_copy, layers)
    with pytest.raises(ModelLoadingError, match=f"do not match its config.json: .*{problem}"):
        load_model_and_processor(model_copy, device="cpu")
    assert main(["chat", "--model", str(model_copy), "--image", str(image_file), "--prompt", "Hi"]) == 1
    assert "random parameters" in capsys.readouterr().err


def test_weights_of_other_shapes_than_the_config_gives_are_refused(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadingError, match="do not match its config.json: some have other shapes"):
        load_model_and_processor(model_copy, device="cpu")


def test_a_folder_without_processor_files_says_so(model_copy):
    for path in model_copy.iterdir():
        if path.name not in ("config.json", "model.safetensors", "generation_config.json"):
            path.unlink()
    with pytest.raises(ModelLoadingError, match="cannot load the processor"):
        load_model_and_processor(model_copy, device="cpu")


def test_a_sound_model_loads_on_the_asked_device_and_dtype(tiny_model_dir):
    import torch

    model, processor = load_model_and_processor(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert model.device.type == "cpu" and model.dtype == torch.bfloat16 and not model.training
    assert processor.tokenizer.padding_side == "left"
