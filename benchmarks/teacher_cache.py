"""The teacher cache on the quickstart setup (SmolLM2-135M-Instruct, V = 49152): what it stores,
how close the top-k teacher is, how fast it reads, and what it saves per step.

    python benchmarks/teacher_cache.py                 # sections 1-4 (~6 min on 2 cores)
    python benchmarks/teacher_cache.py --full-run      # + section 5 (~15 min more)

1. Bytes per target token of each mode (a 16-example subset; the size per token does not
   depend on the count), and ``hidden`` exactness: the loss of one batch from a float32 and a
   bfloat16 hidden cache against the online teacher.
2. The top-k teacher (float16 log-probs, as stored) against the full teacher: relative error
   of the TAID loss and of its gradient w.r.t. the student logits, k in {8, 32, 64, 256},
   t in {0.4, 1.0}, on held-out batches, with the quickstart's initial student.
3. Writing the k = 64 cache of the whole quickstart data, then reading it back: target tokens
   per second (first read, which checks each shard's SHA-256, and a second read).
4. Training steps from the k = 64 cache and from a bfloat16 hidden-state cache against steps
   beside the online teacher (same config, ``--steps`` steps, the first two not counted):
   seconds per step and the fraction of the step spent waiting for data (batch + cached rows).
5. ``--full-run``: the whole quickstart beside the teacher, from the k = 64 cache and from the
   hidden cache; every final student evaluated against the real teacher (held-out KL and
   perplexity). Finished runs (their ``final/``) are reused when the command is repeated.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from taid import cache as T
from taid import data as D
from taid import functional as TF
from taid import trainer as TR
from taid.config import load_config
from taid.sources import LogitsTeacher, TopKTeacher

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
QUIET = ["log.progress=false", "log.trackers=[]", "log.samples=0", "log.plot=false"]


def cfg(out: Path, *overrides: str):
    return load_config(QUICKSTART, [f"output_dir={out / 'run'}", *QUIET, *overrides])


def bytes_per_token(out: Path) -> list[str]:
    lines = ["| mode | dtype | bytes per target token | vs full float32 |", "|---|---|---|---|"]
    full = None
    sizes = {}
    for mode, dtype in (
        ("full", "float32"),
        ("full", "bfloat16"),
        ("hidden", "bfloat16"),
        ("hidden", "float32"),
        ("topk", "float16"),
    ):
        where = out / f"sub-{mode}-{dtype}"
        c = cfg(
            out,
            f"teacher.cache_dir={where}",
            f"cache.mode={mode}",
            f"cache.dtype={dtype}",
            "data.max_examples=16",
            "data.eval_size=4",
        )
        T.write_cache(c, progress=False)
        b = T.TeacherCache(where).bytes_per_token()
        sizes[(mode, dtype)] = b
        full = full or b
        label = f"{mode} (k=64)" if mode == "topk" else mode
        lines.append(f"| {label} | {dtype} | {b:,.0f} | {full / b:,.0f} x smaller |")
    # hidden exactness on one batch of the subset
    for dtype in ("float32", "bfloat16"):
        where = out / f"sub-hidden-{dtype}"
        over = [
            f"teacher.cache_dir={where}",
            "cache.mode=hidden",
            f"cache.dtype={dtype}",
            "data.max_examples=16",
            "data.eval_size=4",
        ]
        online = TR.build(cfg(out, *over))
        cached = TR.build(cfg(out, *over, "teacher.source=cache"))
        batch = next(
            iter(
                D.BatchStream(
                    online.train_examples,
                    8,
                    seed=0,
                    pad_id=online.tokenizer.pad_token_id,
                    packed=False,
                )
            )
        )
        want = TR.batch_loss(online, batch, online.loss_fn).loss.item()
        got = TR.batch_loss(cached, batch, cached.loss_fn).loss.item()
        lines.append(
            f"\nhidden {dtype}: loss from the cache {got:.8f}, online {want:.8f}, "
            f"relative difference {abs(got - want) / want:.2e}"
        )
    return lines


def topk_error(out: Path) -> list[str]:
    s = TR.build(cfg(out))
    batches = list(D.eval_batches(s.eval_examples, 8, s.tokenizer.pad_token_id, False, limit=3))
    lines = [
        "| k | mean tail mass | t | loss rel. error | gradient rel. error |",
        "|---|---|---|---|---|",
    ]
    rows = []
    for batch in batches:
        with torch.no_grad():
            t_logits = s.teacher(**TR.model_inputs(batch)).logits
            s_logits = s.student(**TR.model_inputs(batch)).logits
        valid = batch["labels"] != -100
        rows.append((s_logits[valid], t_logits[valid]))
    student = torch.cat([r[0] for r in rows])
    teacher = torch.cat([r[1] for r in rows])
    log_p = torch.log_softmax(teacher.float(), -1)
    for k in (8, 32, 64, 256):
        top = log_p.topk(k, -1)
        tail = 1 - top.values.double().exp().sum(-1)
        source = TopKTeacher(top.values.half(), top.indices, teacher.shape[-1])
        for t in (0.4, 1.0):
            losses, grads = [], []
            for src in (LogitsTeacher(teacher), source):
                x = student.clone().requires_grad_(True)
                loss = TF.loss_terms("taid", x, src, t=t).loss
                loss.backward()
                losses.append(loss.item())
                grads.append(x.grad)
            rel = abs(losses[1] - losses[0]) / losses[0]
            g = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
            lines.append(f"| {k} | {tail.mean():.4f} | {t} | {rel:.2e} | {g:.2e} |")
    lines.append(
        f"\n({student.shape[0]} held-out target tokens; student = the quickstart's "
        f"initial 6-layer cut)"
    )
    return lines


def write_and_read(out: Path) -> tuple[list[str], Path]:
    where = out / "quickstart-topk64"
    c = cfg(out, f"teacher.cache_dir={where}")
    existed = (where / T.MANIFEST).is_file()
    start = time.perf_counter()
    T.write_cache(c, progress=False)
    wrote = time.perf_counter() - start
    cache = T.TeacherCache(where)
    n_rows = sum(s["num_rows"] for s in cache.shards)
    speed = (
        "already written by an earlier run (not timed)"
        if existed
        else f"written in {wrote:.0f} s ({n_rows / wrote:,.0f} target tokens/s, teacher "
        f"forward included)"
    )
    lines = [
        f"{cache.num_examples} examples, {n_rows} target tokens, {speed}; "
        f"{cache.bytes_per_token():.0f} bytes per token, "
        f"{sum(s['bytes'] for s in cache.shards) / 2**20:.1f} MiB"
    ]
    for label, reader in (("first read (SHA-256 checked)", cache), ("second read", cache)):
        order = torch.randperm(cache.num_examples).tolist()
        start = time.perf_counter()
        for i in range(0, len(order), 8):
            rows = reader.example_rows(order[i : i + 8])
            TopKTeacher(rows["log_probs"], T.unpack_ids(rows["ids"]), cache.vocab_size)
        took = time.perf_counter() - start
        lines.append(
            f"{label}: {n_rows / took:,.0f} target tokens/s (batches of 8 examples in random order)"
        )
    return lines, where


def hidden_cache(out: Path) -> Path:
    where = out / "quickstart-hidden"
    T.write_cache(cfg(out, f"teacher.cache_dir={where}", "cache.mode=hidden"), progress=False)
    return where


TEACHERS = {
    "model": "online model",
    "topk": "cache (top-64, float16)",
    "hidden": "cache (hidden, bfloat16)",
}


def _source(name: str, caches: dict[str, Path]) -> list[str]:
    if name == "model":
        return ["teacher.source=model"]
    return ["teacher.source=cache", f"teacher.cache_dir={caches[name]}", f"cache.mode={name}"]


def steps(out: Path, caches: dict[str, Path], n: int) -> list[str]:
    lines = ["| teacher | s per step (median) | data wait | target tokens/s |", "|---|---|---|---|"]
    per = {}
    for source in TEACHERS:
        run = out / f"steps-{source}"
        shutil.rmtree(run, ignore_errors=True)
        TR.train(
            load_config(
                QUICKSTART,
                [
                    f"output_dir={run}",
                    *QUIET,
                    *_source(source, caches),
                    f"train.max_steps={n}",
                    "train.eval_every=0",
                    "train.save_every=0",
                    "data.eval_size=8",
                    "train.warmup_steps=1",
                ],
            )
        )
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        recs = [r for r in recs if "step_s" in r][2:]
        step = statistics.median(r["step_s"] for r in recs)
        wait = sum(r["data_s"] for r in recs) / sum(r["step_s"] for r in recs)
        tok = sum(r["tokens"] for r in recs) / sum(r["step_s"] for r in recs)
        per[source] = step
        lines.append(f"| {TEACHERS[source]} | {step:.2f} | {100 * wait:.2f}% | {tok:,.0f} |")
    lines.append(
        f"\nspeed-up from the cache: top-64 {per['model'] / per['topk']:.2f} x, hidden "
        f"{per['model'] / per['hidden']:.2f} x"
    )
    return lines


def full_run(out: Path, caches: dict[str, Path]) -> list[str]:
    lines = [
        "| run | wall (s) | held-out KL(teacher, student) | student ppl | teacher ppl |",
        "|---|---|---|---|---|",
    ]
    results = {}
    for source in TEACHERS:
        run = out / f"full-{source}"
        wall_file = run / "wall_s"
        if not wall_file.is_file():
            shutil.rmtree(run, ignore_errors=True)
            start = time.perf_counter()
            TR.train(
                load_config(QUICKSTART, [f"output_dir={run}", *QUIET, *_source(source, caches)])
            )
            wall_file.write_text(f"{time.perf_counter() - start}\n")
        wall = float(wall_file.read_text())
        # Both students measured against the real teacher, whatever they trained from.
        judge = TR.build(
            load_config(
                QUICKSTART,
                [
                    f"output_dir={out / 'judge'}",
                    *QUIET,
                    "student.init=pretrained",
                    f"student.name_or_path={run / 'final'}",
                    "overwrite=true",
                ],
            )
        )
        m = TR.evaluate(judge)
        results[source] = m
        lines.append(
            f"| {TEACHERS[source]} | "
            f"{wall:.0f} | {m['eval/kl_teacher_student']:.4f} | "
            f"{m['eval/student_ppl']:.2f} | {m['eval/teacher_ppl']:.2f} |"
        )
    a = results["model"]
    for source in ("topk", "hidden"):
        b = results[source]
        lines.append(
            f"{TEACHERS[source]}: "
            + ", ".join(
                f"{key} {100 * (b[key] - a[key]) / a[key]:+.2f}%"
                for key in ("eval/kl_teacher_student", "eval/student_ppl")
            )
            + " vs online"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench_teacher_cache")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--full-run", action="store_true")
    parser.add_argument(
        "--only", nargs="*", type=int, default=None, help="run only these sections (1-5)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    only = set(args.only or [1, 2, 3, 4] + ([5] if args.full_run else []))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU'}\n"
    )
    sections = [
        (1, "1. Bytes per target token (SmolLM2-135M-Instruct, V = 49152)", bytes_per_token),
        (2, "2. Top-k teacher vs full teacher (TAID loss and gradient)", topk_error),
    ]
    for number, title, fn in sections:
        if number in only:
            start = time.perf_counter()
            print(
                f"## {title}\n\n"
                + "\n".join(fn(out))
                + f"\n\n({time.perf_counter() - start:.0f} s)\n",
                flush=True,
            )
    if only & {3, 4, 5}:
        lines, cache_dir = write_and_read(out)
        print(
            "## 3. Writing and reading the k = 64 cache of the quickstart data\n\n"
            + "\n".join(lines)
            + "\n",
            flush=True,
        )
        caches = {"topk": cache_dir, "hidden": hidden_cache(out)}
    if 4 in only:
        print(
            f"## 4. Step time, quickstart setup ({args.steps} steps)\n\n"
            + "\n".join(steps(out, caches, args.steps))
            + "\n",
            flush=True,
        )
    if 5 in only:
        print(
            "## 5. The whole quickstart from the caches vs beside the teacher\n\n"
            + "\n".join(full_run(out, caches))
            + "\n",
            flush=True,
        )


if __name__ == "__main__":
    main()
