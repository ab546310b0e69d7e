"""Every registered loss on one setup, measured the same way, and a capacity-gap sweep.

    python experiments/compare.py                      # the comparison of docs/results.md
    python experiments/compare.py --quick              # tiny random models, ~1 minute

The plan is ``experiments/compare.yaml``: a run config shared by every method (same student,
steps, learning rate, batches; a seed fixes the data order, so each seed gives every method the
same batches), the seeds, the methods (loss overrides only) and the sweep. The teacher runs
once: its outputs are cached (``cache_mode``) and every run reads them.

Per run, on the held-out examples: KL(teacher || student) and the student's perplexity on the
responses (the trainer's final evaluation), the student's probability mass on its 10 most likely
tokens (head) and on the tokens in the 80-100th percentile of its distribution (tail), as in the
paper's Table 3, and ROUGE-L (``rouge-score``) of its greedy answers against the held-out
references. Finished runs are skipped when the command is repeated (``--fresh`` redoes them).
The report is written between markers in ``--report`` (default docs/results.md), so the text
around the tables survives a rerun; figures go beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from taid import cache as T
from taid import data as D
from taid import models as M
from taid import trainer as TR
from taid.config import Config, ConfigError, load_config

HERE = Path(__file__).resolve().parent
PLAN_KEYS = {
    "config",
    "overrides",
    "cache_mode",
    "seeds",
    "methods",
    "generation",
    "capacity",
    "quick",
}
BEGIN, END = "<!-- compare.py: begin -->", "<!-- compare.py: end -->"


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------
def load_plan(path: Path, quick: bool) -> dict[str, Any]:
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - PLAN_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; valid: {sorted(PLAN_KEYS)}")
    plan = {k: v for k, v in raw.items() if k != "quick"}
    if quick:
        plan.update(raw.get("quick") or {})
    plan["config"] = (path.parent / plan["config"]).resolve()
    return plan


def config_for(plan: dict[str, Any], out: Path, *extra: str) -> Config:
    return load_config(
        plan["config"], [*plan["overrides"], f"output_dir={out}", "overwrite=true", *extra]
    )


# --------------------------------------------------------------------------------------------
# Metrics beyond the trainer's
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def probability_mass(s: TR.Setup) -> dict[str, float]:
    """Mean student mass per held-out target token on its top-10 tokens and on the tokens in
    the 80-100th percentile of its distribution (the least likely 20% of the vocabulary)."""
    s.student.eval()
    head = tail = 0.0
    n = 0
    for batch in D.eval_batches(
        s.eval_examples, s.config.train.batch_size, s.tokenizer.pad_token_id, s.config.data.packing
    ):
        logits = s.student(**TR.model_inputs(batch), use_cache=False).logits
        rows = logits[batch["labels"] != -100]
        width = s.vocab_size or rows.shape[-1]
        cut = int(0.8 * width)
        for chunk in rows[:, :width].split(128):
            p = torch.softmax(chunk.float(), -1).sort(-1, descending=True).values
            head += p[:, :10].sum().item()
            tail += p[:, cut:].sum().item()
            n += chunk.shape[0]
    s.student.train()
    return {"head_mass": head / max(n, 1), "tail_mass": tail / max(n, 1)}


def prompts_and_references(
    examples: list[D.Example], tokenizer: Any, n: int
) -> tuple[list[list[int]], list[str]]:
    """Each example's tokens before its first target token, and its first target span as
    text (the reference answer)."""
    prompts, refs = [], []
    for ex in examples[:n]:
        first = ex.targets.index(1)
        end = next((i for i in range(first, len(ex.targets)) if not ex.targets[i]), len(ex.targets))
        prompts.append(ex.input_ids[:first])
        refs.append(tokenizer.decode(ex.input_ids[first:end], skip_special_tokens=True).strip())
    return prompts, refs


@torch.no_grad()
def greedy_answers(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy continuations of ``prompts``, batched with left padding."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    answers = []
    for i in range(0, len(prompts), batch_size):
        group = prompts[i : i + batch_size]
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        answers += [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]
    model.train(was_training)
    return answers


def rouge_l(answers: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (x 100) with Porter stemming."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise SystemExit(
            "ROUGE-L needs the rouge-score package: pip install rouge-score "
            "(it is in this project's dev extra)"
        ) from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, ans)["rougeL"].fmeasure for ans, ref in zip(answers, references)]
    return 100 * statistics.fmean(scores) if scores else float("nan")


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
def run_one(
    plan: dict[str, Any],
    out: Path,
    overrides: list[str],
    *,
    keep_final: bool = False,
    fresh: bool = False,
) -> dict[str, Any]:
    """Train one configuration (or reuse its summary) and measure it."""
    summary_path = out / "summary.json"
    if summary_path.is_file() and not fresh:
        return json.loads(summary_path.read_text())
    config = config_for(plan, out, *overrides)
    start = time.perf_counter()
    result = TR.train(config)
    wall = time.perf_counter() - start
    s = result["setup"]
    gen = plan["generation"]
    prompts, refs = prompts_and_references(s.eval_examples, s.tokenizer, gen["prompts"])
    answers = greedy_answers(
        s.accelerator.unwrap_model(s.student), s.tokenizer, prompts, gen["max_new_tokens"]
    )
    history = TR.read_metrics(out / "metrics.jsonl")
    summary = {
        "overrides": overrides,
        "wall_s": wall,
        "steps": result["steps"],
        "kl": result["after"].get("eval/kl_teacher_student"),
        "ppl": result["after"]["eval/student_ppl"],
        "teacher_ppl": result["after"].get("eval/teacher_ppl"),
        "rougeL": rouge_l(answers, refs),
        **probability_mass(s),
        "answers": answers[:3],
        "history": [
            {k: r[k] for k in ("step", "loss", "t") if k in r} for r in history if "loss" in r
        ],
    }
    for name in ("checkpoints",) + (() if keep_final else ("final",)):
        shutil.rmtree(out / name, ignore_errors=True)  # gigabytes each, not needed
    tmp = summary_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, summary_path)
    return summary


def teacher_reference(
    plan: dict[str, Any], out: Path, teacher_overrides: list[str]
) -> dict[str, Any]:
    """The teacher's own ROUGE-L and size, on the same prompts."""
    path = out / "teacher.json"
    if path.is_file():
        return json.loads(path.read_text())
    config = config_for(plan, out / "unused", *teacher_overrides)
    tokenizer = M.run_tokenizer(config)
    train, held = D.load_examples(config.data, tokenizer)
    if not held:
        eval_seed = config.seed if config.data.eval_seed is None else config.data.eval_seed
        train, held = D.split_eval(train, config.data.eval_size, eval_seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        teacher = M.freeze(M.load_model(config.teacher))
    gen = plan["generation"]
    prompts, refs = prompts_and_references(held, tokenizer, gen["prompts"])
    ref = {
        "rougeL": rouge_l(greedy_answers(teacher, tokenizer, prompts, gen["max_new_tokens"]), refs),
        "params": sum(p.numel() for p in teacher.parameters()),
        "layers": teacher.config.num_hidden_layers,
    }
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ref))
    return ref


def write_teacher_cache(
    plan: dict[str, Any], cache_dir: Path, teacher_overrides: list[str]
) -> None:
    T.write_cache(
        config_for(
            plan,
            cache_dir.parent / "unused",
            *teacher_overrides,
            f"teacher.cache_dir={cache_dir}",
            f"cache.mode={plan['cache_mode']}",
        ),
        progress=False,
    )


def loss_overrides(method: list[str]) -> list[str]:
    """A method's loss settings replace the config's loss section (whose parameters belong to
    its own loss)."""
    return ["loss={}", *method]


def comparison(plan: dict[str, Any], out: Path, fresh: bool) -> dict[str, list[dict]]:
    cache_dir = out / "teacher-cache"
    write_teacher_cache(plan, cache_dir, [])
    source = [
        "teacher.source=cache",
        f"teacher.cache_dir={cache_dir}",
        f"cache.mode={plan['cache_mode']}",
    ]
    runs: dict[str, list[dict]] = {m: [] for m in plan["methods"]}
    for seed in plan["seeds"]:
        for method, loss in plan["methods"].items():
            print(f"[compare] {method} seed {seed}", flush=True)
            # The teacher scores student generations online (a cache cannot); the same
            # teacher and data otherwise.
            online = config_for(plan, out / "unused", *loss_overrides(loss))
            teacher = [] if online.student_data.enabled() else source
            runs[method].append(
                run_one(
                    plan,
                    out / "runs" / method / f"seed{seed}",
                    [*teacher, f"seed={seed}", *loss_overrides(loss)],
                    fresh=fresh,
                )
            )
    return runs


def capacity(plan: dict[str, Any], out: Path, fresh: bool) -> list[dict[str, Any]]:
    """One fixed student distilled from teachers of several sizes."""
    cap = plan["capacity"]
    root = out / "capacity"
    base_cache = out / "teacher-cache"
    base = config_for(plan, root / "unused")
    cap_plan = {**plan, "overrides": [*plan["overrides"], *cap.get("overrides", [])]}

    # The fixed student: cut from the base teacher once, saved, loaded by every run.
    student_dir = root / "student"
    if not (student_dir / "config.json").is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(base.seed)
            teacher = M.load_model(base.teacher)
        student = M.student_from_teacher_layers(teacher, cap["student_layers"], "float32")
        student.save_pretrained(student_dir)
        M.run_tokenizer(base).save_pretrained(student_dir)
    student = [
        "student.init=pretrained",
        f"student.name_or_path={student_dir}",
        "student.architecture=null",
        "student.layers=null",
    ]

    rows = []
    for spec in cap["teachers"]:
        name = spec["name"]
        if "layers" in spec:  # a smaller teacher: cut from the base teacher, distilled from it
            print(f"[capacity] training teacher {name}", flush=True)
            run_one(
                plan,
                root / "teachers" / name,
                [
                    "teacher.source=cache",
                    f"teacher.cache_dir={base_cache}",
                    f"cache.mode={plan['cache_mode']}",
                    *loss_overrides(["loss.name=fkl"]),
                    "student.init=teacher_layers",
                    f"student.layers={spec['layers']}",
                    f"train.max_steps={spec['steps']}",
                ],
                keep_final=True,
                fresh=fresh,
            )
            teacher = [
                f"teacher.name_or_path={root / 'teachers' / name / 'final'}",
                "teacher.architecture=null",
            ]
            cache_dir = root / f"cache-{name}"
            write_teacher_cache(plan, cache_dir, teacher)
        else:
            teacher, cache_dir = [], base_cache
        ref = teacher_reference(plan, root / "reference" / name, teacher)
        row = {"teacher": name, **ref, "students": {}}
        for method in cap["methods"]:
            for seed in cap["seeds"]:
                print(f"[capacity] {name}: {method} seed {seed}", flush=True)
                summary = run_one(
                    cap_plan,
                    root / "runs" / name / method / f"seed{seed}",
                    [
                        *teacher,
                        *student,
                        "teacher.source=cache",
                        f"teacher.cache_dir={cache_dir}",
                        f"cache.mode={plan['cache_mode']}",
                        f"seed={seed}",
                        *loss_overrides(plan["methods"][method]),
                    ],
                    fresh=fresh,
                )
                row["students"].setdefault(method, []).append(summary)
                row["teacher_ppl"] = summary["teacher_ppl"]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _ms(values: list[float], digits: int, scale: float = 1.0) -> str:
    values = [v * scale for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def plot_training(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 5
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (method, summaries) in zip(axes.flat, runs.items()):
        for summary in summaries:
            hist = summary["history"]
            ax.plot(
                [h["step"] for h in hist],
                [h["loss"] for h in hist],
                color="tab:blue",
                alpha=0.6,
                lw=1,
            )
            if hist and "t" in hist[0]:
                twin = ax.twinx()
                twin.plot([h["step"] for h in hist], [h["t"] for h in hist], color="tab:red", lw=1)
                twin.set_ylim(0, 1.05)
                twin.tick_params(labelsize=7, colors="tab:red")
        ax.set_title(method, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    fig.suptitle("training loss (blue, one line per seed) and t (red)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_capacity(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    methods = list(rows[0]["students"]) if rows else []
    sizes = [r["params"] / 1e6 for r in rows]
    for method in methods:
        ppl = [statistics.fmean(s["ppl"] for s in r["students"][method]) for r in rows]
        rouge = [statistics.fmean(s["rougeL"] for s in r["students"][method]) for r in rows]
        left.plot(sizes, ppl, marker="o", label=method)
        right.plot(sizes, rouge, marker="o", label=method)
    for ax, label in ((left, "student held-out perplexity"), (right, "student ROUGE-L")):
        ax.set_xlabel("teacher parameters (M)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(
    plan: dict[str, Any],
    runs: dict[str, list[dict]],
    teacher: dict[str, Any],
    cap: list[dict[str, Any]],
    wall: float,
    command: str,
    figures: Path,
    relative: str,
) -> str:
    first = next(iter(runs.values()))[0]
    teacher_ppl = next(
        s["teacher_ppl"]
        for summaries in runs.values()
        for s in summaries
        if s["teacher_ppl"] is not None
    )
    lines = [
        f"Command: `{command}` ({len(plan['seeds'])} seeds x {len(runs)} methods, "
        f"{first['steps']} steps each; total wall time {wall / 60:.0f} min on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU only'}).",
        "",
        "Held-out metrics after training, mean ± standard deviation over seeds. KL is "
        "KL(teacher || student) per target token; perplexity is the student's on the held-out "
        "responses; head / tail are the student's mass on its top-10 tokens / on its least "
        "likely 20% of the vocabulary (x 1e-7), as in the paper's Table 3; ROUGE-L (x 100) "
        "compares greedy answers with the references.",
        "",
        "| method | KL | perplexity | ROUGE-L | head mass | tail mass (1e-7) | min per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, summaries in runs.items():
        lines.append(
            f"| {method} | {_ms([s['kl'] for s in summaries], 4)} | "
            f"{_ms([s['ppl'] for s in summaries], 2)} | "
            f"{_ms([s['rougeL'] for s in summaries], 1)} | "
            f"{_ms([s['head_mass'] for s in summaries], 3)} | "
            f"{_ms([s['tail_mass'] for s in summaries], 2, 1e7)} | "
            f"{_ms([s['wall_s'] for s in summaries], 1, 1 / 60)} |"
        )
    lines += [
        f"| teacher | 0 | {teacher_ppl:.2f} | {teacher['rougeL']:.1f} | | | |",
        "",
        f"![loss and t per method]({relative}/loss_and_t.png)",
        "",
    ]
    if cap:
        methods = list(cap[0]["students"])
        lines += [
            "Capacity gap: one fixed student, teachers of several sizes; student "
            "held-out perplexity / ROUGE-L.",
            "",
            "| teacher | parameters | layers | teacher ppl | teacher ROUGE-L | "
            + " | ".join(methods)
            + " |",
            "|---|---|---|---|---|" + "---|" * len(methods),
        ]
        for row in cap:
            cells = [
                f"{_ms([s['ppl'] for s in row['students'][m]], 2)} / "
                f"{_ms([s['rougeL'] for s in row['students'][m]], 1)}"
                for m in methods
            ]
            lines.append(
                f"| {row['teacher']} | {row['params'] / 1e6:.1f} M | {row['layers']} | "
                f"{row['teacher_ppl']:.2f} | {row['rougeL']:.1f} | " + " | ".join(cells) + " |"
            )
        lines += ["", f"![capacity gap]({relative}/capacity.png)", ""]
    return "\n".join(lines)


def write_report(path: Path, body: str) -> None:
    block = f"{BEGIN}\n{body}\n{END}"
    if path.is_file() and BEGIN in path.read_text():
        text = path.read_text()
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = f"# Results\n\n{block}\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(HERE / "compare.yaml"))
    parser.add_argument(
        "--quick", action="store_true", help="the plan's quick section: tiny models, about a minute"
    )
    parser.add_argument("--out", default=None, help="run directory (default runs/compare[-quick])")
    parser.add_argument(
        "--report",
        default=None,
        help="markdown file for the tables (default docs/results.md; with --quick, OUT/results.md)",
    )
    parser.add_argument("--no-capacity", action="store_true", help="skip the sweep")
    parser.add_argument("--fresh", action="store_true", help="redo finished runs")
    args = parser.parse_args(argv)
    plan = load_plan(Path(args.config), args.quick)
    out = Path(args.out or ("runs/compare-quick" if args.quick else "runs/compare"))
    report_path = Path(args.report or (out / "results.md" if args.quick else "docs/results.md"))
    figures = report_path.parent / ("results" if not args.quick else "figures")
    figures.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    runs = comparison(plan, out, args.fresh)
    teacher = teacher_reference(plan, out / "reference", [])
    cap = [] if args.no_capacity or not plan.get("capacity") else capacity(plan, out, args.fresh)
    wall = time.perf_counter() - start

    plot_training(runs, figures / "loss_and_t.png")
    if cap:
        plot_capacity(cap, figures / "capacity.png")
    command = "python experiments/compare.py" + (" --quick" if args.quick else "")
    body = report(
        plan,
        runs,
        teacher,
        cap,
        wall,
        command,
        figures,
        os.path.relpath(figures, report_path.parent),
    )
    write_report(report_path, body)
    print(body)
    return {"runs": runs, "capacity": cap, "report": report_path, "figures": figures}


if __name__ == "__main__":
    main(sys.argv[1:])
