"""The quickstart's optimizer step on this machine under each CPU option, in fresh processes,
one after the other: float32, bfloat16 autocast (``train.mixed_precision=bf16``), packing, a
teacher cache, torch.compile of the student.

    python benchmarks/cpu_step.py [--steps 10] [--options fp32,bf16,packing,fp32+cache]

An option is one name or several joined by ``+`` (``bf16+cache``). ``cache`` first writes a
hidden-state teacher cache of the quickstart's examples (``taid-cache-teacher``, timed: the
one-off cost the steps repay) and trains from it. For each option: the median step time and
target tokens/s after two warm-up steps, the training loss of every step relative to float32
(the same batches unless packing changes them), and the held-out KL(teacher || student) after
the steps. The CPU is named with the features that decide
the answer (AMX, and AVX-512 BF16 on AMD, make bfloat16 faster than float32; AVX-512 BF16
on Intel without AMX, and AVX2 alone, do not: docs/benchmarks.md).
Run it alone: timings on a shared 2-core machine vary 10-30% run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {
    "fp32": ["train.mixed_precision=no"],
    "bf16": ["train.mixed_precision=bf16"],
    "packing": ["data.packing=true"],
    "cache": ["teacher.source=cache", "cache.mode=hidden"],
    "compile": ["train.compile=true"],
}
CONFIG = ROOT / "configs" / "quickstart.yaml"
# The examples every run and the cache share (a cache is refused by runs of other data)
DATA = ["data.eval_size=16"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def overrides(option: str, workdir: Path) -> list[str]:
    out = [o for part in option.split("+") for o in OPTIONS[part]]
    if "cache" in option.split("+"):
        out.append(f"teacher.cache_dir={workdir / 'teacher-cache'}")
    return out


def write_cache(workdir: Path) -> float:
    """Write the hidden-state cache once (later options reuse it); its wall time."""
    start = time.perf_counter()
    subprocess.run(
        [
            str(Path(sys.executable).parent / "taid-cache-teacher"),
            "--config",
            str(CONFIG),
            *overrides("cache", workdir),
            *DATA,
            "log.progress=false",
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
        env=ENV,
    )
    return time.perf_counter() - start


def run(option: str, steps: int, workdir: Path) -> dict:
    out = workdir / option
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "--config",
        str(CONFIG),
        f"output_dir={out}",
        "overwrite=true",
        f"train.max_steps={steps}",
        "train.eval_every=0",
        "train.save_every=0",
        "train.warmup_steps=2",
        *DATA,
        "log.samples=0",
        "log.progress=false",
        "log.plot=false",
        "log.trackers=[]",
        *overrides(option, workdir),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    timed = train[2:] or train
    after = [r for r in rows if "eval/kl_teacher_student" in r][-1]
    return {
        "step_s": statistics.median(r["step_s"] for r in timed),
        "tokens_per_s": statistics.median(r["tokens"] / r["step_s"] for r in timed),
        "losses": [r["loss"] for r in train],
        "kl": after["eval/kl_teacher_student"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--options", default="fp32,bf16,packing")
    args = parser.parse_args()
    options = args.options.split(",")
    from taid.hardware import describe_device

    print(describe_device())
    print(f"python benchmarks/cpu_step.py --steps {args.steps} --options {args.options}\n")
    with tempfile.TemporaryDirectory() as tmp:
        if any("cache" in option.split("+") for option in options):
            print(f"teacher cache written in {write_cache(Path(tmp)):.1f} s (once)\n")
        results = {option: run(option, args.steps, Path(tmp)) for option in options}
    base = results.get("fp32", {})
    print(
        "| option | step s | tokens/s | x fp32 tokens/s | max loss rel. diff. vs fp32 | "
        "held-out KL |"
    )
    print("|---|---|---|---|---|---|")
    for option, r in results.items():
        if "error" in r:
            print(f"| {option} | failed: {r['error']} | | | | |")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if "tokens_per_s" in base else None
        diff = (
            max(abs(a / b - 1) for a, b in zip(r["losses"], base["losses"]))
            if "losses" in base and "packing" not in option.split("+")
            else None
        )
        print(
            f"| {option} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | "
            f"{'-' if diff is None else f'{diff:.2e}'} | {r['kl']:.4f} |"
        )


if __name__ == "__main__":
    main()
