"""Servers the serving tests start: a subprocess on 127.0.0.1, waited for, and always stopped.

Each server runs in its own process group with its output in a log file; if it dies or does
not answer in time, the error carries the log's tail so CI shows why.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from launchers import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("PIIP_VLLM_PYTHON", REPO_ROOT / ".venv-vllm" / "bin" / "python"))
VLLM_COMMAND = VLLM_PYTHON.parent / "vllm"  # vLLM's own command line, in the same environment
# vLLM refuses images over this many pixels with a 400 (VLLM_MAX_IMAGE_PIXELS); the web page's default limit too.
MAX_IMAGE_PIXELS = 25_000_000
# vLLM's internal sockets on this machine, that image limit, no usage report.
VLLM_ENVIRONMENT = {
    "VLLM_HOST_IP": "127.0.0.1", "VLLM_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS), "VLLM_NO_USAGE_STATS": "1"
}
# The engine's settings for the bundled model on a CPU (eager: no torch.compile at start-up; on the CPU build the
# "GPU" memory share is the host memory reserved for the KV cache, whose default 0.92 a shared machine refuses).
VLLM_ENGINE_OPTIONS = {"enforce_eager": True, "dtype": "float32", "max_model_len": 512, "gpu_memory_utilization": 0.05}


def log_tail(log_path: Path) -> str:
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return "\n".join(line for line in text.splitlines() if "is ignored: it is neither" not in line)[-6000:]


def wait_until_ready(process: subprocess.Popen, ready_url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The server exited with code {process.returncode} before answering:\n{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(ready_url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise RuntimeError(f"The server did not answer {ready_url} within {timeout_s:.0f} s:\n{log_tail(log_path)}")


def stop(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the server's process group (vLLM's engine runs in child processes), SIGKILL after `grace_s`."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace_s)


@contextmanager
def running_server(command: list[str], ready_url: str, log_path: Path, timeout_s: float, env: dict | None = None):
    """Start `command`, wait until `ready_url` answers 200, yield the process, then stop it whatever happened.

    The server runs in the log's folder, so it imports the installed package as a user's would,
    not whatever the current directory holds.
    """
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=log_path.parent, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
    try:
        wait_until_ready(process, ready_url, log_path, timeout_s)
        yield process
    finally:
        stop(process)


def command_line_options(options: dict) -> list[str]:
    """`{"enforce_eager": True, "dtype": "float32"}` as vLLM's flags: `--enforce-eager --dtype float32`."""
    flags = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        flags.extend([flag] if value is True else [flag, str(value)])
    return flags


@contextmanager
def running_vllm_server(model_dir: Path, log_path: Path):
    """`vllm serve DIR` from the vLLM environment, as a user starts it (CPU, eager); yields its URL."""
    port = free_port()
    command = [
        str(VLLM_COMMAND), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
        *command_line_options(VLLM_ENGINE_OPTIONS),
    ]
    url = f"http://127.0.0.1:{port}"
    with running_server(command, f"{url}/health", log_path, timeout_s=900, env=VLLM_ENVIRONMENT):
        yield url
