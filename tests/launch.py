"""Two CPU processes under accelerate, as the tests launch them (torchrun + gloo; see
configs/accelerate/cpu_2proc.yaml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}


def two_processes(
    script: Path, *args: str, env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run ``script args...`` in two processes with ``accelerate launch``; output captured."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"),
        str(script),
        *args,
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, env={**ENV, **(env or {})}, cwd=ROOT, timeout=timeout
    )
