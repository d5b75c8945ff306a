"""Offline inference with vLLM's `LLM(model=DIR)`: run by test_serving_vllm.py in the vLLM environment.

Usage: python vllm_offline_chat.py REQUEST.json ANSWERS.json

REQUEST.json holds {"model": DIR, "engine": {LLM's keyword arguments}, "max_tokens": N,
"questions": [{"image": PATH, "prompt": TEXT}, ...]}; ANSWERS.json receives one
{"token_ids": [...], "text": ...} per question, in order. All questions go to `LLM.chat` as one
batch, each a user message with its image as a data URL, decoded greedily.

Nothing from piip_llava is imported here, as in a user's script: vLLM's `vllm.general_plugins`
entry point has to make the architecture known in every vLLM process.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

from vllm import LLM, SamplingParams


def image_message(image_path: str, prompt: str) -> list[dict]:
    data = base64.b64encode(Path(image_path).read_bytes()).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                {"type": "text", "text": prompt},
            ],
        }
    ]


def main(request_path: str, answers_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    llm = LLM(model=request["model"], **request["engine"])
    conversations = [image_message(question["image"], question["prompt"]) for question in request["questions"]]
    outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=request["max_tokens"]))
    answers = [{"token_ids": list(output.outputs[0].token_ids), "text": output.outputs[0].text} for output in outputs]
    Path(answers_path).write_text(json.dumps(answers))


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this file
    main(*sys.argv[1:])
