"""Running the trainer in the tests: two CPU processes under accelerate (torchrun + gloo; see
configs/accelerate/cpu_2proc.yaml), and a kill at a chosen step."""

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


class Killed(Exception):
    """Raised by :func:`kill_at_step` in place of a micro-batch's loss: a crash mid-run."""


def kill_at_step(monkeypatch, step: int, *, grad_accum: int = 2, micro: int = 1) -> None:
    """Make taid's training loop raise :class:`Killed` in micro-batch ``micro`` of optimizer
    step ``step`` (both 1-based), as a kill there would stop it."""
    from taid import trainer as T

    real, calls = T.batch_loss, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == grad_accum * (step - 1) + micro:
            raise Killed(f"killed in step {step}, micro-batch {micro}")
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "batch_loss", crashing)
