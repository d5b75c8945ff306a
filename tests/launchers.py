"""What the tests that start other processes share: DeepSpeed's launcher and a free port on 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

# The dev extra installs DeepSpeed; its launcher sits beside this interpreter when the venv is not on PATH.
DEEPSPEED = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment (the operating system picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
