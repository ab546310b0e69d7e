"""What each objective costs over cross-entropy, on a real teacher's and student's outputs.

Language-model distributions are peaked (a handful of tokens hold most of the mass), and some
objectives' cost depends on that (adaptive KL looks for the tokens holding the first ``mu`` of
the teacher's mass), so random logits would mislead: the built-in teacher SmolLM2-135M-Instruct
and its 6-layer cut (the quickstart student) are run once over the first conversations of
data/distill.jsonl, and every registered loss (chunked path, float32, default parameters) takes
its forward and backward over the same ``[N, 49152]`` logits. Time: the minimum over
``--reps`` runs after a warm-up; ratio: to ``F.cross_entropy`` on the same rows, in the same
process.

    python benchmarks/objectives.py                 # N = 1024 rows, 5 repetitions
    python benchmarks/objectives.py --rows 512 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from taid import models as M  # noqa: E402
from taid.hardware import describe_device  # noqa: E402
from taid.losses import LOSSES, build_loss, loss_parameters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def real_logits(rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits, teacher logits ``[rows, V]`` and next-token labels ``[rows]`` from the
    built-in teacher and its 6-layer cut over the first conversations of the data."""
    teacher, tokenizer, student = M.load_builtin(student_layers=6)
    assert student is not None
    s_rows, z_rows, labels = [], [], []
    with torch.no_grad(), (ROOT / "data" / "distill.jsonl").open() as f:
        for line in f:
            ids = tokenizer.apply_chat_template(json.loads(line)["messages"], return_tensors="pt")
            ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
            s_rows.append(student(ids).logits[0, :-1].float())
            z_rows.append(teacher(ids).logits[0, :-1].float())
            labels.append(ids[0, 1:])
            if sum(len(x) for x in labels) >= rows:
                break
    return torch.cat(s_rows)[:rows], torch.cat(z_rows)[:rows], torch.cat(labels)[:rows]


def fastest(fn, reps: int) -> float:
    """The minimum time of ``reps`` calls, after one untimed call (allocations, threads)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    s, z, labels = real_logits(args.rows)

    def ce() -> None:
        x = s.clone().requires_grad_(True)
        F.cross_entropy(x, labels).backward()

    base = fastest(ce, args.reps)
    print(f"{describe_device()}; N = {s.shape[0]}, V = {s.shape[1]}, float32, chunked path")
    print("| objective | forward + backward s | x cross-entropy |")
    print("|---|---|---|")
    print(f"| `F.cross_entropy` | {base:.3f} | 1.00 |")
    for name in LOSSES:
        steps = {"total_steps": 1} if "total_steps" in loss_parameters(name) else {}
        loss_fn = build_loss(name, **steps)

        def run(loss_fn=loss_fn) -> None:
            x = s.clone().requires_grad_(True)
            loss_fn(x, z, labels).backward()

        t = fastest(run, args.reps)
        print(f"| {name} | {t:.3f} | {t / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
