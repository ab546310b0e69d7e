"""CPU feature detection and the precision ``train.mixed_precision=auto`` picks."""

from __future__ import annotations

import pytest
import torch

from taid import hardware as H

ZEN3 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n"
ZEN4 = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: avx2 avx512f avx512_bf16\n"
SPR = (
    "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
    "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    "processor\t: 1\nmodel name\t: other\nflags\t\t: avx2\n"
)


@pytest.mark.parametrize(
    "text, model, native",
    [
        (ZEN3, "AMD EPYC 7B13", False),
        (ZEN4, "AMD EPYC 9B14", True),
        (SPR, "Intel(R) Xeon(R) Platinum 8481C", True),  # the first processor's lines
        ("", "unknown CPU", False),  # no /proc/cpuinfo: nothing assumed
    ],
)
def test_cpuinfo_is_parsed_and_native_bf16_needs_amx_or_avx512_bf16(text, model, native):
    cpu = H.parse_cpuinfo(text, cores=2)
    assert cpu.model == model
    assert cpu.native_bf16 is native
    line = cpu.describe()
    assert model in line and "2 cores" in line
    if native:
        assert "avx512_bf16" in line


@pytest.mark.parametrize(
    "requested, cuda, bf16_cpu, expected",
    [
        ("auto", False, True, "bf16"),
        ("auto", False, False, "no"),
        ("no", False, True, "no"),
        ("bf16", False, False, "bf16"),  # an explicit choice is kept, even where slow
        ("fp16", False, False, "fp16"),
    ],
)
def test_resolve_precision(requested, cuda, bf16_cpu, expected):
    assert H.resolve_precision(requested, cuda=cuda, bf16_cpu=bf16_cpu) == expected


def test_auto_on_this_machine_follows_its_cpu():
    expected = "bf16" if H.cpu().native_bf16 else "no"
    if torch.cuda.is_available():
        pytest.skip("CUDA present: auto follows the GPU")
    assert H.resolve_precision("auto") == expected
