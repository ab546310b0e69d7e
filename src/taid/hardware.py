"""What the machine can do, detected rather than assumed: the CPU's model and the instruction
sets that decide whether bfloat16 is fast, and the device a run will use.

bfloat16 autocast is faster than float32 on a CPU only where its bfloat16 matrix products
beat the float32 ones, which the instruction sets decide together with the vendor:

- AMX (``amx_bf16``, Intel Sapphire Rapids and later, where the hypervisor exposes it): tile
  instructions, several times float32's throughput by Intel's figures (not measured here).
- AVX-512 BF16 on AMD (Zen 4 and later): measured 1.99x float32's tokens/s on the quickstart's
  step (docs/benchmarks.md), oneDNN's bfloat16 kernels against a float32 GEMM that is not
  tuned for AMD.
- AVX-512 BF16 on Intel without AMX (Cooper Lake; a Sapphire Rapids or later Xeon whose
  hypervisor hides AMX): measured 0.59x, slower: Intel's float32 GEMM uses the same AVX-512
  units at full speed and bfloat16 adds conversions. Float32 is the faster choice there.
- AVX2 alone (AMD Zen 3 and older, most laptops): bfloat16 is emulated, converted to float32
  and back around every product: slower than float32.

``native_bf16`` says whether the instructions exist; ``bf16_faster`` whether to use them.
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
    vendor: str = "unknown"  # /proc/cpuinfo's vendor_id: GenuineIntel, AuthenticAMD

    @property
    def native_bf16(self) -> bool:
        """True when the CPU has bfloat16 matrix instructions (AMX or AVX-512 BF16)."""
        return "amx_bf16" in self.flags or "avx512_bf16" in self.flags

    @property
    def bf16_faster(self) -> bool:
        """True where bfloat16 autocast trains faster than float32 on this kind of CPU: AMX,
        or AVX-512 BF16 on AMD; not AVX-512 BF16 on Intel without AMX (see the module)."""
        if "amx_bf16" in self.flags:
            return True
        return self.native_bf16 and self.vendor == "AuthenticAMD"  # AVX-512 BF16 on AMD

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
    model, flags, vendor = "unknown CPU", frozenset[str](), "unknown"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key == "vendor_id" and vendor == "unknown":
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CPU(model, flags, cores, vendor)


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
    ``bf16`` where bfloat16 is native and faster (a CUDA device that supports it; a CPU with
    AMX, or an AMD one with AVX-512 BF16: :attr:`CPU.bf16_faster`) and ``no`` (float32)
    elsewhere.

    ``cuda`` and ``bf16_cpu`` override the detection (for tests).
    """
    if requested != "auto":
        return requested
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "no"
    if bf16_cpu is None:
        bf16_cpu = cpu().bf16_faster
    return "bf16" if bf16_cpu else "no"
