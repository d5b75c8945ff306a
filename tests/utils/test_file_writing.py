"""Files we write atomically get the mode any other file of the user gets, and a reader never sees half of one."""

from __future__ import annotations

import os
import stat

import pandas as pd
import pytest

from piip_llava.evaluation.answers_file import atomic_write_json, repair_answers_file
from piip_llava.evaluation.mmbench import write_submission
from piip_llava.file_writing import atomic_write_text


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_atomic_writer_gives_the_usual_mode(umask, tmp_path):
    usual = 0o666 & ~umask
    atomic_write_text(tmp_path / "a.txt", "text")
    atomic_write_json(tmp_path / "metrics.json", {"accuracy": 0.5})
    write_submission(pd.DataFrame({"index": [1], "prediction": ["A"]}), tmp_path / "submission.xlsx")
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"question_id": 1}\n{"question_id": 2, "te')  # a kill mid-line; repairing rewrites the file
    os.chmod(answers, usual)
    repair_answers_file(answers)
    assert {name: mode(tmp_path / name) for name in os.listdir(tmp_path)} == {
        "a.txt": usual, "metrics.json": usual, "submission.xlsx": usual, "answers.jsonl": usual
    }


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_write_text(target, b"bytes where text belongs")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]
