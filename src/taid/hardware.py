"""What the machine can do, detected rather than assumed: the CPU's model and the instruction
sets that decide whether bfloat16 is fast, and the device a run will use.

bfloat16 matrix products are fast on a CPU only with native bfloat16 instructions: AMX
(``amx_bf16``, Intel Sapphire Rapids and later) or AVX-512 BF16 (``avx512_bf16``: Intel Cooper
Lake and later, AMD Zen 4 and later). With AVX2 alone (AMD Zen 3 and older, most laptops)
PyTorch converts to float32 and back around every product, which is slower than float32.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

#: The flags that matter for the precision choice, in the order they are reported.
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class CPU:
    """The CPU's model name, its relevant flags and the number of cores this process may use."""

    model: str
    flags: frozenset[str]
    cores: int

    @property
    def native_bf16(self) -> bool:
        """True when the CPU has bfloat16 matrix instructions (AMX or AVX-512 BF16)."""
        return "amx_bf16" in self.flags or "avx512_bf16" in self.flags

    def describe(self) -> str:
        """One line naming the CPU, its relevant flags, cores and torch's CPU capability."""
        have = " ".join(f for f in RELEVANT_FLAGS if f in self.flags)
        return (
            f"{self.model}, {self.cores} cores; flags: {have or 'none of ' + str(RELEVANT_FLAGS)};"
            f" torch {torch.__version__}, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}"
        )


def parse_cpuinfo(text: str, cores: int) -> CPU:
    """The CPU described by the text of ``/proc/cpuinfo`` (its first processor)."""
    model, flags = "unknown CPU", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CPU(model, flags, cores)


@functools.cache
def cpu() -> CPU:
    """This machine's CPU (from ``/proc/cpuinfo`` on Linux; elsewhere the model is unknown
    and no flag is assumed)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    path = Path("/proc/cpuinfo")
    text = path.read_text() if path.is_file() else ""
    return parse_cpuinfo(text, cores or 1)


def describe_device() -> str:
    """The device a run uses: the GPU's name when CUDA is available, else the CPU line."""
    if torch.cuda.is_available():
        return (
            f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
        )
    return cpu().describe()


def resolve_precision(
    requested: str, *, cuda: bool | None = None, bf16_cpu: bool | None = None
) -> str:
    """The autocast precision a run uses: ``requested`` unless it is ``auto``, which picks
    ``bf16`` where bfloat16 is native (a CUDA device that supports it; a CPU with AMX or
    AVX-512 BF16) and ``no`` (float32) elsewhere.

    ``cuda`` and ``bf16_cpu`` override the detection (for tests).
    """
    if requested != "auto":
        return requested
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "no"
    if bf16_cpu is None:
        bf16_cpu = cpu().native_bf16
    return "bf16" if bf16_cpu else "no"
