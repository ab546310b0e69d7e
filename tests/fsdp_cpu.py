"""``taid-train`` under accelerate's FSDP2 on CPU processes (gloo), for the tests.

accelerate (1.15) picks FSDP only on accelerators; on CPU it falls back to plain data
parallelism. This launcher builds the Accelerator as the trainer does, then tells accelerate's
state that the run is FSDP2 with a full-state-dict plugin, so that ``accelerator.prepare``
shards the student and the teacher with ``fully_shard`` for real. Nothing else changes.

With TAID_TEST_CRASH_AT_STEP=N the run raises in optimizer step N (1-based), to test resume.

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml tests/fsdp_cpu.py \\
        --config configs/smoke.yaml output_dir=...
"""

from __future__ import annotations

import os
import sys
from typing import Any

from taid import models as M
from taid import trainer as T

_make_accelerator = M.make_accelerator


def fsdp_accelerator(timeout_s: int, **kwargs: Any) -> Any:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = _make_accelerator(timeout_s, **kwargs)
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        state_dict_type="FULL_STATE_DICT",
        reshard_after_forward=True,
    )
    return accelerator


def crash_at(step: int) -> None:
    real, calls = T.batch_loss, {"n": 0}

    def crashing(s: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == s.config.train.grad_accum * (step - 1) + 1:
            raise SystemExit(17)
        return real(s, *args, **kwargs)

    T.batch_loss = crashing


if __name__ == "__main__":
    M.make_accelerator = fsdp_accelerator
    if os.environ.get("TAID_TEST_CRASH_AT_STEP"):
        crash_at(int(os.environ["TAID_TEST_CRASH_AT_STEP"]))
    from taid.cli import train_main

    sys.exit(train_main())
