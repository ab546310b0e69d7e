"""CPU feature detection and the precision ``train.mixed_precision=auto`` picks."""

from __future__ import annotations

import pytest
import torch

from taid import hardware as H

ZEN3 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
    "flags\t\t: fpu sse2 avx avx2 fma\n"
)
ZEN4 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n"
    "flags\t\t: avx2 avx512f avx512_bf16\n"
)
SPR = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
    "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    "processor\t: 1\nvendor_id\t: other\nmodel name\t: other\nflags\t\t: avx2\n"
)
# A Xeon whose hypervisor hides AMX: AVX-512 BF16 without it (bf16 measured 0.59x float32)
XEON_NO_AMX = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
    "flags\t\t: avx2 avx512f avx512_bf16 avx512_fp16\n"
)


@pytest.mark.parametrize(
    "text, model, vendor, native, faster",
    [
        (ZEN3, "AMD EPYC 7B13", "AuthenticAMD", False, False),
        (ZEN4, "AMD EPYC 9B14", "AuthenticAMD", True, True),
        # the first processor's lines
        (SPR, "Intel(R) Xeon(R) Platinum 8481C", "GenuineIntel", True, True),
        (XEON_NO_AMX, "Intel(R) Xeon(R) Processor", "GenuineIntel", True, False),
        ("", "unknown CPU", "unknown", False, False),  # no /proc/cpuinfo: nothing assumed
    ],
)
def test_cpuinfo_is_parsed_and_bf16_is_used_where_it_is_faster(text, model, vendor, native, faster):
    cpu = H.parse_cpuinfo(text, cores=2)
    assert (cpu.model, cpu.vendor) == (model, vendor)
    assert cpu.native_bf16 is native
    assert cpu.bf16_faster is faster
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
    expected = "bf16" if H.cpu().bf16_faster else "no"
    if torch.cuda.is_available():
        pytest.skip("CUDA present: auto follows the GPU")
    assert H.resolve_precision("auto") == expected
