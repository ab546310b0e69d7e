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
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from taid import cache as T
from taid import checkpoint as CK
from taid import data as D
from taid import models as M
from taid import trainer as TR
from taid.config import Config, ConfigError, load_config, to_dict
from taid.hardware import describe_device

HERE = Path(__file__).resolve().parent
PLAN_KEYS = {
    "config",
    "overrides",
    "cache_mode",
    "seeds",
    "methods",
    "generation",
    "capacity",
    "results",
    "curves",
    "paired",
    "single_seed",
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
    if plan.get("results"):
        plan["results"] = (path.parent / plan["results"]).resolve()
    return plan


def config_for(plan: dict[str, Any], out: Path, *extra: str) -> Config:
    return load_config(plan["config"], [*plan["overrides"], f"output_dir={out}", *extra])


def open_run(plan: dict[str, Any], out: Path, overrides: list[str]) -> tuple[Config, int | None]:
    """The config of a run in ``out`` that has no result yet, and the step it resumes from
    (``None``: from the start). It resumes from the last checkpoint there when the same
    configuration in the same precision wrote it (``auto`` picks bfloat16 on some kinds of CPU
    only; the checkpoint records the one used), and starts over, saying why, when another did.
    A run that finished training but was stopped while being measured is finished again from
    its last checkpoint (its ``final`` folder is removed, so that the trainer hands back a
    setup to measure)."""
    config = config_for(plan, out, *overrides)
    try:
        checkpoint = TR.check_output_dir(config)
    except (ConfigError, CK.CheckpointError) as e:
        print(f"[compare] {out}: starting over ({e})", flush=True)
        return config_for(plan, out, *overrides, "overwrite=true"), None
    shutil.rmtree(out / "final", ignore_errors=True)
    return config, None if checkpoint is None else CK.step_of(checkpoint)


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


def stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """The token ids that end an answer: the model's end-of-sequence ids and the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    out = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        out.add(tokenizer.eos_token_id)
    return out


@torch.no_grad()
def greedy_answers(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16
) -> tuple[list[str], list[list[int]]]:
    """Greedy continuations of ``prompts``, batched with left padding: their text, and their
    token ids up to and including the first end-of-sequence token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    answers, answer_ids = [], []
    stops = stop_ids(model, tokenizer)
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
        for row in out[:, width:].tolist():
            end = next((k + 1 for k, tok in enumerate(row) if tok in stops), len(row))
            answer_ids.append(row[:end])
            answers.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers, answer_ids


@torch.no_grad()
def teacher_nll(teacher: Any, prompts: list[list[int]], answers: list[list[int]]) -> float:
    """The teacher's mean negative log-likelihood per token of ``answers`` given their
    ``prompts`` (token-weighted over all answers): how likely the teacher finds what the student
    says, without reference answers. Lower is better."""
    device = next(teacher.parameters()).device
    total, count = 0.0, 0
    for prompt, answer in zip(prompts, answers):
        if not answer:
            continue
        ids = torch.tensor([prompt + answer], device=device)
        logits = teacher(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1]
        logp = torch.log_softmax(logits.float(), -1)
        target = torch.tensor(answer, device=device)[:, None]
        total -= float(logp.gather(1, target).double().sum())
        count += len(answer)
    return total / count if count else float("nan")


def load_teacher(config: Config) -> Any:
    """The run's teacher, built as the trainer builds it (a random one from its architecture
    draws with the run's seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return M.freeze(M.load_model(config.teacher))


_SCORERS: dict[str, Any] = {}


def scoring_teacher(config: Config) -> Any:
    """The teacher that scores a run's answers, loaded once per process and teacher; two kept
    at a time (a capacity run is scored by its own teacher and by the base teacher, the
    ladder visits its teachers in turn)."""
    key = json.dumps([config.teacher.name_or_path, config.teacher.architecture, config.seed])
    if key not in _SCORERS:
        if len(_SCORERS) >= 2:
            del _SCORERS[next(iter(_SCORERS))]  # the oldest
        _SCORERS[key] = load_teacher(config)
    return _SCORERS[key]


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
    result_path: Path,
    *,
    keep_final: bool = False,
    fresh: bool = False,
    judge: Config | None = None,
) -> dict[str, Any]:
    """Train one configuration and measure it, or read its result file if it exists (a
    finished run is never redone unless ``fresh``). An interrupted run resumes from its last
    checkpoint in ``out``. ``judge``: a configuration whose teacher also scores the answers
    (``judge_nll``), one yardstick for students of different teachers."""
    if result_path.is_file() and not fresh:
        return json.loads(result_path.read_text())
    config, resumed_at = open_run(plan, out, overrides)
    start = time.perf_counter()
    result = TR.train(config)
    train_s = time.perf_counter() - start
    s = result["setup"]
    history = TR.read_metrics(out / "metrics.jsonl")
    resolved = to_dict(config)
    summary = {
        "overrides": overrides,
        # what the overrides resolved to: the loss and its parameters, and the student data
        "loss": resolved["loss"],
        "student_data": resolved["student_data"] if config.student_data.enabled() else None,
        "machine": describe_device(),
        "precision": s.accelerator.mixed_precision,  # what train.mixed_precision=auto chose
        "wall_s": train_s,  # this call's: a resumed run's is its last part only
        "resumed_at": resumed_at,
        "step_s": step_seconds(history, result["steps"]),
        "steps": result["steps"],
        "kl": result["after"].get("eval/kl_teacher_student"),
        "ppl": result["after"]["eval/student_ppl"],
        "teacher_ppl": result["after"].get("eval/teacher_ppl"),
        "teacher_weights_sha256": teacher_digest(s),
        **generation_metrics(plan, config, s, judge),
        **probability_mass(s),
        **curves(history),
    }
    summary["eval_s"] = time.perf_counter() - start - train_s
    for name in ("checkpoints",) + (() if keep_final else ("final",)):
        shutil.rmtree(out / name, ignore_errors=True)  # gigabytes each, not needed
    result_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, result_path)
    return summary


def teacher_digest(s: TR.Setup) -> str | None:
    """The SHA-256 of the teacher's weights a run trained from, as the manifest of the cache it
    read recorded it (``None`` for an online teacher). A capacity teacher healed again on
    another machine is another copy of it: the report says when one teacher's students come
    from several."""
    return None if s.cache is None else s.cache.manifest.get("teacher_weights_sha256")


def generation_metrics(
    plan: dict[str, Any], config: Config, s: TR.Setup, judge: Config | None = None
) -> dict[str, Any]:
    """ROUGE-L of the student's greedy answers to the held-out prompts against the references,
    the teacher's NLL of those answers, and with ``judge`` the NLL its teacher gives them."""
    gen = plan["generation"]
    prompts, refs = prompts_and_references(s.eval_examples, s.tokenizer, gen["prompts"])
    student = s.accelerator.unwrap_model(s.student)
    answers, answer_ids = greedy_answers(student, s.tokenizer, prompts, gen["max_new_tokens"])
    teacher = s.teacher if s.teacher is not None else scoring_teacher(config)
    scores = answer_scores(teacher, prompts, answers, answer_ids, refs)
    if judge is not None:
        scores["judge_nll"] = teacher_nll(scoring_teacher(judge), prompts, answer_ids)
    return {**scores, "answers": answers[:3]}


def answer_scores(
    teacher: Any,
    prompts: list[list[int]],
    answers: list[str],
    answer_ids: list[list[int]],
    refs: list[str],
) -> dict[str, Any]:
    """How greedy answers to the held-out prompts are scored, the students' and the teacher's
    alike: ROUGE-L against the references, the teacher's NLL, mean length, repetition."""
    return {
        "rougeL": rouge_l(answers, refs),
        "teacher_nll": teacher_nll(teacher, prompts, answer_ids),
        "answer_tokens": statistics.fmean(len(a) for a in answer_ids) if answer_ids else 0.0,
        "repeated_4grams": repeated_ngrams(answer_ids, 4),
    }


def repeated_ngrams(answers: list[list[int]], n: int) -> float | None:
    """The mean over answers of the fraction of an answer's token n-grams that already occurred
    earlier in it: 0 for an answer that never repeats itself, near 1 for a loop. The teacher's
    NLL rewards repetition (a model finds a repeated phrase likely), so it is read beside this.
    Answers shorter than ``n`` tokens are left out; ``None`` when none is long enough."""
    fractions = []
    for ids in answers:
        grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
        if grams:
            fractions.append(1.0 - len(set(grams)) / len(grams))
    return statistics.fmean(fractions) if fractions else None


def step_seconds(history: list[dict[str, Any]], steps: int) -> float | None:
    """The run's optimizer steps' time: the median logged step time times the steps. Unlike
    the wall time it counts each step once across a resume (the metrics are cut back to the
    checkpoint), leaves out evaluations and set-up, and is not moved by the minutes a shared
    machine slowed some steps, so runs measured in different sittings compare."""
    times = [r["step_s"] for r in history if "step_s" in r]
    return statistics.median(times) * steps if times else None


def curves(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The training loss and t per step, and the held-out KL at every evaluation. A step
    evaluated twice (a run finished again after its measurement was stopped) counts once,
    with its last row."""
    evals = {r["step"]: r for r in history if "eval/kl_teacher_student" in r}
    return {
        "history": [
            {k: r[k] for k in ("step", "loss", "t") if k in r} for r in history if "loss" in r
        ],
        "eval_curve": [
            {
                "step": step,
                "kl": r["eval/kl_teacher_student"],
                **({"t": r["eval/t"]} if "eval/t" in r else {}),
            }
            for step, r in sorted(evals.items())
        ],
    }


def teacher_reference(
    plan: dict[str, Any], out: Path, teacher_overrides: list[str]
) -> dict[str, Any]:
    """The teacher's own ROUGE-L and size, on the same prompts."""
    path = out / "teacher.json"
    if path.is_file():
        return json.loads(path.read_text())
    config = config_for(plan, out / "unused", *teacher_overrides)
    tokenizer = M.run_tokenizer(config)
    _, held = D.held_out(*D.load_examples(config.data, tokenizer), config.data, config.seed)
    teacher = load_teacher(config)
    gen = plan["generation"]
    prompts, refs = prompts_and_references(held, tokenizer, gen["prompts"])
    answers, answer_ids = greedy_answers(teacher, tokenizer, prompts, gen["max_new_tokens"])
    ref = {
        **answer_scores(teacher, prompts, answers, answer_ids, refs),
        "params": sum(p.numel() for p in teacher.parameters()),
        "layers": teacher.config.num_hidden_layers,
        "teacher_weights_sha256": T.weights_hash(teacher),
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
    its own loss); a recipe (``recipe=gkd``) replaces it itself."""
    if any(o.startswith("recipe=") for o in method):
        return list(method)
    return ["loss={}", *method]


@dataclass
class Selection:
    """Which runs this invocation may train, in the order of ``methods`` (within a seed); the
    others are only read if their result exists (``report_only``: none is trained)."""

    methods: list[str] | None = None
    seeds: set[int] | None = None
    teachers: set[str] | None = None  # the capacity ladder's rungs (None: all)
    report_only: bool = False
    fresh: bool = False

    def order(self, names: list[str]) -> list[str]:
        """``names`` with the selected methods first, in the order they were given."""
        chosen = [m for m in self.methods or [] if m in names]
        return chosen + [m for m in names if m not in chosen]

    def trains(self, method: str, seed: int, teacher: str | None = None) -> bool:
        """Whether to train this run: a main comparison's (``teacher`` None) or a capacity
        student's of ``teacher``."""
        return (
            not self.report_only
            and (self.methods is None or method in self.methods)
            and (self.seeds is None or seed in self.seeds)
            and (teacher is None or self.prepares(teacher))
        )

    def prepares(self, teacher: str) -> bool:
        """Whether this invocation may heal a capacity teacher and measure its reference."""
        return not self.report_only and (self.teachers is None or teacher in self.teachers)


def seeds_of(plan: dict[str, Any], method: str) -> list[int]:
    """The seeds a method runs with: all of the plan's, or the first only for the methods in
    ``single_seed`` (the budget's choice, said in the report)."""
    return plan["seeds"][:1] if method in plan.get("single_seed", []) else plan["seeds"]


def comparison(
    plan: dict[str, Any], out: Path, sel: Selection
) -> tuple[dict[str, list[dict]], list[str]]:
    """Every (seed, method) of the plan: run (or read) each; returns the results by method, in
    seed order, and the runs still missing."""
    cache_dir = out / "teacher-cache"
    source = [
        "teacher.source=cache",
        f"teacher.cache_dir={cache_dir}",
        f"cache.mode={plan['cache_mode']}",
    ]
    runs: dict[str, list[dict]] = {m: [] for m in plan["methods"]}
    missing = []
    cache_ready = False
    for seed in plan["seeds"]:
        for method in sel.order(list(plan["methods"])):
            loss = plan["methods"][method]
            if seed not in seeds_of(plan, method):
                continue
            path = plan["results"] / "main" / method / f"seed{seed}.json"
            if not path.is_file() and not sel.trains(method, seed):
                missing.append(f"{method} seed {seed}")
                continue
            if not path.is_file() or sel.fresh:
                print(f"[compare] {method} seed {seed}", flush=True)
            # The teacher scores student generations online (a cache cannot); the same
            # teacher and data otherwise.
            online = config_for(plan, out / "unused", *loss_overrides(loss))
            teacher = [] if online.student_data.enabled() else source
            if teacher and not cache_ready and (sel.fresh or not path.is_file()):
                write_teacher_cache(plan, cache_dir, [])  # a rerun checks and reuses it
                cache_ready = True
            summary = run_one(
                plan,
                out / "runs" / method / f"seed{seed}",
                [*teacher, f"seed={seed}", *loss_overrides(loss)],
                path,
                fresh=sel.fresh,
            )
            runs[method].append({**summary, "seed": seed})
    return runs, missing


Run = tuple[str, int, Path]


def _capacity_runs(
    cap: dict[str, Any], teacher: str, results: Path, sel: Selection
) -> tuple[list[Run], list[Run]]:
    """One teacher's student runs: every (method, seed, result file) of the plan, and those
    this call trains (selected, and not finished unless ``fresh``)."""
    results = results / teacher
    planned = [
        (method, seed, results / method / f"seed{seed}.json")
        for method in cap["methods"]
        for seed in cap["seeds"]
    ]
    todo = [
        (m, seed, p)
        for m, seed, p in planned
        if (sel.fresh or not p.is_file()) and sel.trains(m, seed, teacher)
    ]
    return planned, todo


def capacity(
    plan: dict[str, Any], out: Path, sel: Selection, base_ppl: float | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """One fixed student distilled from teachers of several sizes; returns a row per teacher
    and the runs still missing. ``base_ppl``: the base teacher's held-out perplexity as the
    main comparison measured it, for its row while none of its students has finished."""
    cap = plan["capacity"]
    root = out / "capacity"
    results = plan["results"] / "capacity"
    base_cache = out / "teacher-cache"
    base = config_for(plan, root / "unused")
    cap_plan = {**plan, "overrides": [*plan["overrides"], *cap.get("overrides", [])]}
    student = [
        "student.init=pretrained",
        f"student.name_or_path={root / 'student'}",
        "student.architecture=null",
        "student.layers=null",
    ]
    # the base teacher judges every rung's answers: one configuration per seed, not per run
    judges = {seed: config_for(plan, root / "unused", f"seed={seed}") for seed in cap["seeds"]}
    rows, missing = [], []
    for spec in cap["teachers"]:
        name = spec["name"]
        planned, todo = _capacity_runs(cap, name, results, sel)
        missing += [
            f"capacity {name}: {m} seed {seed}"
            for m, seed, p in planned
            if not p.is_file() and (m, seed, p) not in todo
        ]
        ref_dir = results / "reference" / name
        teacher, cache_dir = [], base_cache
        if todo or (not (ref_dir / "teacher.json").is_file() and sel.prepares(name)):
            teacher, cache_dir = capacity_teacher(plan, base, root, results, spec, sel)
        elif not (ref_dir / "teacher.json").is_file():
            missing.append(f"capacity {name}: the teacher")
            continue
        reference = teacher_reference(plan, ref_dir, teacher)
        row: dict[str, Any] = {"teacher": name, **reference, "students": {}}
        for method, seed, path in planned:
            if not path.is_file() and (method, seed, path) not in todo:
                continue
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
                path,
                fresh=sel.fresh,
                judge=judges[seed],
            )
            row["students"].setdefault(method, []).append({**summary, "seed": seed})
        healed = results / "teachers" / f"{name}.json"
        row["teacher_ppl"] = capacity_teacher_ppl(
            row, json.loads(healed.read_text()) if healed.is_file() else None, base_ppl
        )
        rows.append(row)
    return rows, missing


def teacher_ppl_of(summaries: list[dict[str, Any]]) -> float | None:
    """The teacher's held-out perplexity as its students' evaluations measured it (the same
    held-out responses as theirs), or None while no student has finished."""
    return next(iter(teacher_ppls(summaries)), None)


def capacity_teacher_ppl(
    row: dict[str, Any], healed: dict[str, Any] | None, base_ppl: float | None
) -> float | None:
    """A capacity teacher's held-out perplexity: from its students' evaluations when one has
    finished (the mean over copies of the teacher, if it was healed more than once); before
    that, a healed teacher's from its healing run's evaluation (``healed``, its result: the
    same held-out responses, the healed model as the student) and the base teacher's from the
    main comparison (``base_ppl``)."""
    measured = teacher_ppls(_students(row))
    if measured:
        return statistics.fmean(measured)
    return healed["ppl"] if healed is not None else base_ppl


def teacher_ppls(summaries: list[dict[str, Any]]) -> list[float]:
    """A teacher's held-out perplexity as its students measured it, one value per copy of the
    teacher (by weight digest: a teacher healed again on another machine is another copy), in
    the order of ``summaries``."""
    by_copy: dict[str | None, float] = {}
    for s in summaries:
        if s.get("teacher_ppl"):
            by_copy.setdefault(s.get("teacher_weights_sha256"), s["teacher_ppl"])
    return list(by_copy.values())


def _students(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A capacity row's student results, every method's, in order."""
    return [s for runs in row["students"].values() for s in runs]


def capacity_teacher(
    plan: dict[str, Any],
    base: Config,
    root: Path,
    results: Path,
    spec: dict[str, Any],
    sel: Selection,
) -> tuple[list[str], Path]:
    """A capacity teacher ready for its students to train from: the fixed student saved, a
    smaller teacher cut from the base one and healed by distillation from it (``layers``,
    ``steps``), and its cache. Returns its overrides and its cache directory."""
    student_dir = root / "student"
    if not (student_dir / "config.json").is_file():
        base_teacher = load_teacher(base)
        cut = M.student_from_teacher_layers(base_teacher, plan["capacity"]["student_layers"])
        cut.save_pretrained(student_dir)
        M.run_tokenizer(base).save_pretrained(student_dir)
    base_cache = root.parent / "teacher-cache"
    write_teacher_cache(plan, base_cache, [])
    name = spec["name"]
    if "layers" not in spec:  # the base teacher itself
        return [], base_cache
    final = root / "teachers" / name / "final"
    cache_dir = root / f"cache-{name}"
    if not (final / "config.json").is_file():
        print(f"[capacity] training teacher {name}", flush=True)
        shutil.rmtree(cache_dir, ignore_errors=True)  # written from an earlier copy, if any
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
            results / "teachers" / f"{name}.json",
            keep_final=True,
            fresh=True,  # its weights are needed, not only its result
        )
    teacher = [f"teacher.name_or_path={final}", "teacher.architecture=null"]
    write_teacher_cache(plan, cache_dir, teacher)
    return teacher, cache_dir


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


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


#: The capacity ladder's yardstick, the same for every teacher: key, label, lower is better,
#: digits (the held-out responses and the judge are the base teacher's).
LADDER_METRICS = [
    ("ppl", "perplexity", True, 2),
    ("judge_nll", "base teacher's NLL", True, 3),
]

# (summary key, axis label, log scale): perplexities span 30-170 across methods, so a linear
# axis would flatten the differences between the close methods that the ladder is about
CAPACITY_PANELS = (
    ("ppl", "student held-out perplexity (log scale)", True),
    ("judge_nll", "base teacher's NLL of its answers", False),
    ("kl", "KL(own teacher || student)", False),
)


def plot_capacity(rows: list[dict[str, Any]], path: Path) -> None:
    """The student's held-out perplexity, the base teacher's NLL of its answers and its KL to
    its own teacher against the teacher's held-out perplexity (log axis, a tick per rung), mean
    and standard deviation over seeds (results without a panel's measure are left out of it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, len(CAPACITY_PANELS), figsize=(13, 3.4))
    methods = sorted({m for r in rows for m in r["students"]})
    rungs = sorted({r["teacher_ppl"] for r in rows if r.get("teacher_ppl") is not None})
    for method in methods:
        for ax, (key, _, _) in zip(axes, CAPACITY_PANELS):
            points = [
                (r["teacher_ppl"], _stats(values))
                for r in rows
                if (
                    values := [
                        s[key] for s in r["students"].get(method, []) if s.get(key) is not None
                    ]
                )
            ]
            ax.errorbar(
                [x for x, _ in points],
                [m for _, (m, _) in points],
                yerr=[d for _, (_, d) in points],
                marker="o",
                capsize=3,
                label=method,
            )
    for ax, (_, label, log) in zip(axes, CAPACITY_PANELS):
        ax.set_xscale("log")
        ax.set_xticks(rungs, [f"{x:.2f}" for x in rungs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.invert_xaxis()  # the stronger teacher to the right, as the paper draws its ladder
        ax.set_xlabel("teacher held-out perplexity (stronger ->)")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def curve_differences(
    runs: dict[str, list[dict]], treatment: str, baseline: str
) -> list[tuple[int, float, float, int]]:
    """Held-out KL of ``treatment`` minus ``baseline`` at every evaluation step both runs of a
    seed have, paired by seed (same data order, same start): ``(step, mean, sd, seeds)`` per
    step. Seeds whose two runs trained in different precisions are left out, as in
    :func:`paired`."""
    a = {r["seed"]: r for r in runs.get(treatment, []) if r.get("eval_curve")}
    b = {r["seed"]: r for r in runs.get(baseline, []) if r.get("eval_curve")}
    by_step: dict[int, list[float]] = {}
    for seed in sorted(set(a) & set(b)):
        if a[seed].get("precision") != b[seed].get("precision"):
            continue
        base = {p["step"]: p["kl"] for p in b[seed]["eval_curve"]}
        for p in a[seed]["eval_curve"]:
            if p["step"] in base:
                by_step.setdefault(p["step"], []).append(p["kl"] - base[p["step"]])
    return [(step, *_stats(d), len(d)) for step, d in sorted(by_step.items())]


def plot_curves(runs: dict[str, list[dict]], methods: list[str], path: Path) -> None:
    """Top: held-out KL(teacher || student) at every evaluation (mean over seeds, thin lines
    per seed) for ``methods``, and t of the TAID runs on a second axis. Bottom: each method's
    KL minus the first method's, paired by seed (mean, shaded ± one standard deviation), so
    that where a method is behind (above 0) or ahead (below 0) during training is visible at
    the scale of the differences, not of the first evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in methods if any(r.get("eval_curve") for r in runs.get(m, []))]
    fig, (ax, low) = plt.subplots(
        2, 1, figsize=(7, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    twin = ax.twinx()
    for k, method in enumerate(shown):
        color = f"C{k}"
        seeds = [r["eval_curve"] for r in runs[method] if r.get("eval_curve")]
        steps = [p["step"] for p in seeds[0]]
        for curve in seeds:
            ax.plot(
                [p["step"] for p in curve], [p["kl"] for p in curve], color=color, lw=0.5, alpha=0.4
            )
        complete = [c for c in seeds if [p["step"] for p in c] == steps]
        mean = [statistics.fmean(c[i]["kl"] for c in complete) for i in range(len(steps))]
        ax.plot(steps, mean, color=color, lw=1.8, label=f"{method} (KL)")
        if "t" in seeds[0][0]:
            twin.plot(
                steps, [p["t"] for p in seeds[0]], color=color, ls="--", lw=1, label=f"{method} (t)"
            )
        if k > 0:
            _plot_difference(
                low, curve_differences(runs, method, shown[0]), color, f"{method} - {shown[0]}"
            )
    ax.set_ylabel("held-out KL(teacher || student)")
    ax.set_yscale("log")
    twin.set_ylabel("t (dashed)")
    twin.set_ylim(0, 1.05)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper right")
    low.axhline(0.0, color="black", lw=0.8)
    low.set_xlabel("optimizer step")
    low.set_ylabel(f"KL minus {shown[0]}" if shown else "KL difference")
    if low.get_legend_handles_labels()[0]:
        low.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_difference(
    ax: Any, diff: list[tuple[int, float, float, int]], color: str, label: str
) -> None:
    """One method's paired KL difference per step: its mean, shaded ± one standard deviation."""
    if not diff:
        return
    x = [d[0] for d in diff]
    mean = [d[1] for d in diff]
    ax.plot(x, mean, color=color, lw=1.5, label=label)
    ax.fill_between(
        x,
        [m - d[2] for m, d in zip(mean, diff)],
        [m + d[2] for m, d in zip(mean, diff)],
        color=color,
        alpha=0.15,
        lw=0,
    )


#: Held-out metrics compared per seed: key, label, whether lower is better, digits.
METRICS = [
    ("kl", "KL", True, 4),
    ("ppl", "perplexity", True, 2),
    ("teacher_nll", "teacher NLL", True, 3),
    ("rougeL", "ROUGE-L", False, 1),
]


def paired(
    runs: dict[str, list[dict]],
    treatment: str,
    baseline: str,
    metrics: list[tuple[str, str, bool, int]] = METRICS,
) -> dict[str, Any]:
    """Per metric (``metrics``: key, label, lower is better, digits), the differences
    ``treatment - baseline`` over the seeds both have: mean, standard deviation, and how many
    seeds favour each side. A seed whose two runs trained in different precisions (``auto`` on
    different kinds of CPU) is left out and counted: the precision alone moves the metrics by
    about as much as some methods differ."""
    a = {r["seed"]: r for r in runs.get(treatment, [])}
    b = {r["seed"]: r for r in runs.get(baseline, [])}
    both = sorted(set(a) & set(b))
    seeds = [k for k in both if a[k].get("precision") == b[k].get("precision")]
    out: dict[str, Any] = {"seeds": len(seeds), "precision_differs": len(both) - len(seeds)}
    for key, _, lower, _ in metrics:
        diffs = [
            a[k][key] - b[k][key]
            for k in seeds
            if a[k].get(key) is not None and b[k].get(key) is not None
        ]
        diffs = [d for d in diffs if math.isfinite(d)]
        if not diffs:
            continue
        mean, sd = _stats(diffs)
        better = sum(1 for d in diffs if (d < 0) == lower and d != 0)
        worse = sum(1 for d in diffs if (d > 0) == lower and d != 0)
        out[key] = {"mean": mean, "sd": sd, "treatment": better, "baseline": worse, "n": len(diffs)}
    return out


#: How a paired difference reads when it favours the treatment, and when the baseline.
TAID_SIDES = ("TAID better", "TAID worse")


def verdict(cell: dict[str, Any], lower: bool, sides: tuple[str, str] = TAID_SIDES) -> str:
    """``no difference`` when the mean difference is not larger than its spread (or one seed
    only); else which side the seeds favour, named by ``sides`` (treatment's, baseline's)."""
    if cell["n"] < 2:
        return "one seed"
    if abs(cell["mean"]) <= cell["sd"]:
        return "no difference"
    return sides[0] if (cell["mean"] < 0) == lower else sides[1]


def report(
    plan: dict[str, Any],
    runs: dict[str, list[dict]],
    teacher: dict[str, Any] | None,
    cap: list[dict[str, Any]],
    missing: list[str],
    command: str,
    relative: str,
) -> str:
    results = [r for summaries in runs.values() for r in summaries]
    results += [s for row in cap for runs_ in row["students"].values() for s in runs_]
    planned = sum(len(seeds_of(plan, m)) for m in plan["methods"])
    done = sum(len(v) for v in runs.values())
    machines = sorted(
        {
            f"{r.get('machine', 'not recorded')} ({precision_name(r.get('precision'))})"
            for r in results
        }
    )
    hours = sum(r["wall_s"] + r.get("eval_s", 0.0) for r in results) / 3600
    steps = sorted({r["steps"] for summaries in runs.values() for r in summaries})
    lines = [
        f"Command: `{command}`. Runs complete: {done} of {planned} in the main comparison"
        + (f"; still to run: {still_to_run(missing)}" if missing else "")
        + f". Steps per run: {', '.join(map(str, steps)) or 'n/a'}. Wall time of the finished "
        f"runs (training and measurement{resumed_note(results)}): {hours:.1f} h. "
        f"Machine(s): {'; '.join(machines)}."
        + (
            f" One seed only, for the budget: {', '.join(plan['single_seed'])}."
            if plan.get("single_seed")
            else ""
        ),
        "",
        "Held-out metrics after training, mean ± standard deviation over seeds (n: seeds). KL "
        "is KL(teacher || student) per target token; perplexity is the student's on the "
        "held-out responses; teacher NLL is the teacher's mean negative log-likelihood per "
        "token of the student's greedy answers to the held-out prompts (lower: the teacher "
        "finds the answers likely; no reference answer involved); ROUGE-L (x 100) compares "
        "those answers with the references; answer tokens is their mean length (at most "
        f"{plan['generation']['max_new_tokens']}: an answer that never ends sits at the limit, "
        "and the teacher may find a repetitive one likely); repeated 4-grams is the fraction of "
        "an answer's 4-grams of tokens that it already used (near 1: a loop); head / tail are "
        "the student's mass on its top-10 tokens / on its least likely 20% of the vocabulary "
        "(x 1e-7), as in the paper's Table 3; "
        "step min is the minutes of a run's optimizer steps (median step time x steps: "
        "evaluations, set-up and slowdowns by other jobs left out).",
        "",
    ]
    lines += metrics_table(runs, teacher, results)
    lines += ["", *paired_section(plan, runs), ""]
    lines += [
        f"![held-out KL during training]({relative}/curves.png)",
        "",
        f"![loss and t per method]({relative}/loss_and_t.png)",
        "",
    ]
    if cap:
        lines += capacity_section(cap, relative, plan.get("paired", []))
    return "\n".join(lines)


def resumed_note(results: list[dict]) -> str:
    """``; k resumed ...`` when some runs were resumed: their wall time is their last part's."""
    k = sum(r.get("resumed_at") is not None for r in results)
    return (
        f"; {k} resumed run{'s' if k > 1 else ''}: the part after the checkpoint only" if k else ""
    )


def _count(summaries: list[dict]) -> str:
    """`` (n=k)`` when only k of the runs measured repeated 4-grams (added after some ran)."""
    k = sum(s.get("repeated_4grams") is not None for s in summaries)
    return "" if k in (0, len(summaries)) else f" (n={k})"


def still_to_run(missing: list[str]) -> str:
    """The main comparison's missing runs by name; the capacity ladder's counted."""
    main = [m for m in missing if not m.startswith("capacity ")]
    ladder = len(missing) - len(main)
    return ", ".join(main + ([f"the capacity ladder's {ladder} runs"] if ladder else []))


def metrics_table(
    runs: dict[str, list[dict]], teacher: dict[str, Any] | None, results: list[dict]
) -> list[str]:
    """One row per method (mean ± sd over its seeds, or "not run yet"), then the teacher's."""
    lines = [
        "| method | n | KL | perplexity | teacher NLL | ROUGE-L | answer tokens | repeated "
        "4-grams | head mass | tail mass (1e-7) | step min per run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, summaries in runs.items():
        if not summaries:
            lines.append(f"| {method} | 0 | not run yet | | | | | | | | |")
            continue
        lines.append(
            f"| {method} | {len(summaries)} | {_ms([s['kl'] for s in summaries], 4)} | "
            f"{_ms([s['ppl'] for s in summaries], 2)} | "
            f"{_ms([s.get('teacher_nll') for s in summaries], 3)} | "
            f"{_ms([s['rougeL'] for s in summaries], 1)} | "
            f"{_ms([s.get('answer_tokens') for s in summaries], 1)} | "
            f"{_ms([s.get('repeated_4grams') for s in summaries], 2)}{_count(summaries)} | "
            f"{_ms([s['head_mass'] for s in summaries], 3)} | "
            f"{_ms([s['tail_mass'] for s in summaries], 2, 1e7)} | "
            f"{_ms([s.get('step_s') for s in summaries], 1, 1 / 60)} |"
        )
    teacher_ppl = teacher_ppl_of(results)
    if teacher is not None and teacher_ppl is not None:
        lines.append(
            f"| teacher | | 0 | {teacher_ppl:.2f} | {teacher.get('teacher_nll', float('nan')):.3f}"
            f" | {teacher['rougeL']:.1f} | {_ms([teacher.get('answer_tokens')], 1)} | "
            f"{_ms([teacher.get('repeated_4grams')], 2)} | | | |"
        )
    return lines


def paired_section(plan: dict[str, Any], runs: dict[str, list[dict]]) -> list[str]:
    """Per TAID row and baseline: the paired differences over seeds on every metric."""
    lines = [
        "Paired differences, TAID row minus baseline, over the seeds both have: mean ± standard "
        "deviation, then seeds favouring TAID : seeds favouring the baseline, then the reading "
        "(a difference not larger than its spread is called no difference).",
        "",
    ]
    header = " | ".join(label for _, label, _, _ in METRICS)
    for treatment in plan.get("paired", []):
        if not runs.get(treatment):
            continue
        lines += [
            f"**{treatment}** minus each baseline:",
            "",
            f"| baseline | seeds | {header} |",
            "|---|---|" + "---|" * len(METRICS),
        ]
        for baseline in runs:
            if baseline == treatment or not runs[baseline]:
                continue
            p = paired(runs, treatment, baseline)
            cells = [paired_cell(p.get(key), lower, digits) for key, _, lower, digits in METRICS]
            lines.append(f"| {baseline} | {seeds_cell(p)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def paired_cell(
    c: dict[str, Any] | None, lower: bool, digits: int, sides: tuple[str, str] = TAID_SIDES
) -> str:
    """One metric's paired difference: ``mean ± sd, k:m, reading``; for one seed only the
    difference (no spread, no count to read)."""
    if c is None:
        return "n/a"
    if c["n"] < 2:
        return f"{c['mean']:+.{digits}f}, one seed"
    return (
        f"{c['mean']:+.{digits}f} ± {c['sd']:.{digits}f}, "
        f"{c['treatment']}:{c['baseline']}, {verdict(c, lower, sides)}"
    )


def capacity_section(
    cap: list[dict[str, Any]], relative: str, treatments: Sequence[str] = ()
) -> list[str]:
    """The capacity ladder's table: a row per teacher (its size and quality), a column per
    method with a finished student run; then each method's gain from the stronger teacher,
    the ``treatments`` (TAID rows) against each baseline per teacher, and the figure once a
    student has finished."""
    methods = sorted({m for row in cap for m in row["students"]})
    header = ["teacher", "parameters", "layers", "teacher ppl", "teacher ROUGE-L", *methods]
    lines = [
        "Capacity gap: one fixed student, teachers of different quality. Each cell is the "
        "student's held-out perplexity / the base teacher's NLL of its greedy answers / "
        "their share of repeated 4-grams, mean ± standard deviation over seeds: one "
        "yardstick for every teacher (the held-out responses are the base teacher's, and it "
        "judges every student's answers; a loop lowers that NLL, hence the repetition "
        "beside it), so a column says whether a method's student gains from a stronger "
        "teacher. The figure "
        "adds the student's KL to its own teacher (how closely it imitates the teacher it "
        "had, which is not comparable across teachers).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    notes: list[str] = []
    for row in cap:
        cells = [
            " / ".join(
                _ms([s.get(key) for s in row["students"].get(m, [])], digits)
                for key, digits in [(k, d) for k, _, _, d in LADDER_METRICS]
                + [("repeated_4grams", 2)]
            )
            for m in methods
        ]
        copies = teacher_copies(row)
        if copies > 1:
            notes.append(
                f"{row['teacher']}: its students and reference come from {copies} copies of "
                "the teacher (healed again on another machine); the row mixes them (its "
                "perplexity: one per copy)."
            )
        lines.append(
            "| "
            + " | ".join(
                [
                    row["teacher"],
                    f"{row['params'] / 1e6:.1f} M",
                    str(row["layers"]),
                    teacher_ppl_cell(row),
                    f"{row['rougeL']:.1f}",
                    *cells,
                ]
            )
            + " |"
        )
    if not methods:
        notes.append("No student run of the ladder has finished yet.")
    notes += precision_note(cap)
    notes = [*notes, ""] if notes else []
    figure = [f"![capacity gap]({relative}/capacity.png)", ""] if methods else []
    return lines + [
        "",
        *notes,
        *capacity_gain_section(cap),
        *capacity_paired_section(cap, treatments),
        *figure,
    ]


def teacher_ppl_cell(row: dict[str, Any]) -> str:
    """A capacity teacher's perplexity; one per copy when the row mixes copies of it."""
    per_copy = teacher_ppls(_students(row))
    if len(per_copy) > 1:
        return " / ".join(f"{ppl:.2f}" for ppl in per_copy)
    ppl = row.get("teacher_ppl")
    return "n/a" if ppl is None else f"{ppl:.2f}"


def capacity_gain_section(cap: list[dict[str, Any]]) -> list[str]:
    """Whether each method's student gains from a stronger teacher, the paper's capacity
    claim: per seed, its measure with a stronger teacher minus with a weaker one (the same
    seed: the same data order and start), paired and read as the main comparison's
    differences are; for each step up the ladder (teachers ordered by their perplexity, not
    by the order of the rows) and, with more than two teachers, from the weakest to the
    strongest. Empty until two teachers have a student of the same method."""
    rungs = sorted(
        (r for r in cap if r.get("teacher_ppl") is not None),
        key=lambda r: r["teacher_ppl"],
        reverse=True,
    )
    steps = list(zip(rungs, rungs[1:]))
    if len(rungs) > 2:
        steps.append((rungs[0], rungs[-1]))
    rows = [row for weak, strong in steps for row in _gain_rows(weak, strong)]
    if not rows:
        return []
    return ladder_table(
        "Gain from a stronger teacher: per seed, the student's measure with the stronger "
        "teacher minus with the weaker (negative: the stronger teacher's student is better), "
        "for each step up the ladder and from its weakest to its strongest teacher; mean ± "
        "standard deviation, seeds that gained : seeds that lost, then the reading (a change "
        "not larger than its spread is called no difference).",
        ["teachers", "method"],
        rows,
    )


def ladder_table(intro: str, columns: list[str], rows: list[str]) -> list[str]:
    """A ladder table of paired differences: its introduction, then a header of ``columns``,
    the seeds and one column per ladder metric, then ``rows`` (already formatted)."""
    header = [*columns, "seeds", *(label for _, label, _, _ in LADDER_METRICS)]
    return [
        intro,
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *rows,
        "",
    ]


def _gain_rows(weak: dict[str, Any], strong: dict[str, Any]) -> list[str]:
    """The gain table's rows for one pair of teachers: a row per method both have."""
    rows = []
    for method in [m for m in sorted(strong["students"]) if weak["students"].get(m)]:
        p = paired(
            {"strong": strong["students"][method], "weak": weak["students"][method]},
            "strong",
            "weak",
            LADDER_METRICS,
        )
        cells = [
            paired_cell(p.get(key), lower, digits, ("gains", "loses"))
            for key, _, lower, digits in LADDER_METRICS
        ]
        rows.append(
            f"| {weak['teacher']} → {strong['teacher']} | {method} | {seeds_cell(p)} | "
            + " | ".join(cells)
            + " |"
        )
    return rows


def capacity_paired_section(cap: list[dict[str, Any]], treatments: Sequence[str]) -> list[str]:
    """Per teacher, each TAID row minus each baseline over the seeds both have (the same
    seed: the same data order and precision), on the ladder's yardstick. Empty until a
    teacher has both."""
    rows = []
    for rung in cap:
        runs = rung["students"]
        for treatment in [t for t in treatments if runs.get(t)]:
            for baseline in [m for m in sorted(runs) if m not in treatments and runs[m]]:
                p = paired(runs, treatment, baseline, LADDER_METRICS)
                cells = [
                    paired_cell(p.get(key), lower, digits)
                    for key, _, lower, digits in LADDER_METRICS
                ]
                rows.append(
                    f"| {rung['teacher']} | {treatment} - {baseline} | {seeds_cell(p)} | "
                    + " | ".join(cells)
                    + " |"
                )
    if not rows:
        return []
    return ladder_table(
        "Paired differences on the ladder, TAID row minus baseline with the same teacher, over "
        "the seeds both have: mean ± standard deviation, seeds favouring TAID : seeds favouring "
        "the baseline, then the reading.",
        ["teacher", "difference"],
        rows,
    )


def seeds_cell(p: dict[str, Any]) -> str:
    """How many seeds a paired difference has, and how many were left out (precisions
    differ)."""
    left_out = p["precision_differs"]
    return f"{p['seeds']}" + (f" ({left_out} left out: precisions differ)" if left_out else "")


def precision_name(precision: str | None) -> str:
    """How the report names a run's precision: accelerate's ``mixed_precision`` value as a
    dtype (``"no"``, no autocast, trains in float32)."""
    if precision is None:
        return "precision not recorded"
    return {"no": "float32"}.get(precision, precision)


def precision_note(cap: list[dict[str, Any]]) -> list[str]:
    """A note when the ladder's student runs trained in more than one precision (``auto`` on
    different kinds of CPU), naming the seeds of each; nothing otherwise."""
    seeds: dict[str, set[int]] = {}
    for row in cap:
        for runs in row["students"].values():
            for s in runs:
                if s.get("precision") is not None:  # results that recorded it
                    seeds.setdefault(precision_name(s["precision"]), set()).add(s["seed"])
    if len(seeds) < 2:
        return []
    each = "; ".join(
        f"{name}: seed{'s' if len(k) > 1 else ''} {', '.join(map(str, sorted(k)))}"
        for name, k in sorted(seeds.items())
    )
    return [
        f"The ladder's students trained in different precisions ({each}; `auto` on different "
        "CPUs): a cell's spread includes the precision's effect; the gain table pairs the runs "
        "of one seed, which share theirs."
    ]


def teacher_copies(row: dict[str, Any]) -> int:
    """How many different copies of a capacity teacher (by weight digest) its reference and
    students were made with; results that did not record one are not counted."""
    digests = {row.get("teacher_weights_sha256")} | {
        s.get("teacher_weights_sha256") for runs in row["students"].values() for s in runs
    }
    return len(digests - {None})


def write_report(path: Path, body: str) -> None:
    block = f"{BEGIN}\n{body}\n{END}"
    if path.is_file() and BEGIN in path.read_text():
        text = path.read_text()
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = f"# Results\n\n{block}\n"
    path.write_text(text)


def arguments(argv: list[str] | None) -> argparse.Namespace:
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
    parser.add_argument("--no-capacity", action="store_true", help="skip the capacity ladder")
    parser.add_argument("--fresh", action="store_true", help="redo finished runs")
    parser.add_argument(
        "--methods", default=None, help="train only these, in this order (comma-separated)"
    )
    parser.add_argument("--seeds", default=None, help="train only these seeds (comma-separated)")
    parser.add_argument(
        "--teachers",
        default=None,
        help="capacity ladder: heal and train only these teachers' runs (comma-separated names)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="train nothing; report the finished runs"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = arguments(argv)
    plan = load_plan(Path(args.config), args.quick)
    out = Path(args.out or ("runs/compare-quick" if args.quick else "runs/compare"))
    if args.quick or not plan.get("results"):
        plan["results"] = out / "results"
    report_path = Path(args.report or (out / "results.md" if args.quick else "docs/results.md"))
    figures = report_path.parent / ("results" if not args.quick else "figures")
    figures.mkdir(parents=True, exist_ok=True)
    sel = Selection(
        methods=None if args.methods is None else args.methods.split(","),
        seeds=None if args.seeds is None else {int(x) for x in args.seeds.split(",")},
        teachers=None if args.teachers is None else set(args.teachers.split(",")),
        report_only=args.report_only,
        fresh=args.fresh,
    )
    unknown = set(sel.methods or []) - set(plan["methods"])
    if unknown:
        raise SystemExit(
            f"--methods: unknown {sorted(unknown)}; the plan has {list(plan['methods'])}"
        )
    rungs = [t["name"] for t in plan.get("capacity", {}).get("teachers", [])]
    if set(sel.teachers or []) - set(rungs):
        raise SystemExit(
            f"--teachers: unknown {sorted(set(sel.teachers or []) - set(rungs))}; "
            f"the capacity ladder has {rungs}"
        )

    runs, missing = comparison(plan, out, sel)
    reference = plan["results"] / "reference" / "teacher.json"
    teacher = (
        teacher_reference(plan, reference.parent, [])
        if reference.is_file() or not sel.report_only
        else None
    )
    cap: list[dict[str, Any]] = []
    if not args.no_capacity and plan.get("capacity"):
        main_results = [s for summaries in runs.values() for s in summaries]
        cap, more = capacity(plan, out, sel, teacher_ppl_of(main_results))
        missing += more

    if any(runs.values()):
        plot_training({m: r for m, r in runs.items() if r}, figures / "loss_and_t.png")
        plot_curves(runs, plan.get("curves", []), figures / "curves.png")
    if any(row["students"] for row in cap):
        plot_capacity(cap, figures / "capacity.png")
    command = "python experiments/compare.py" + (" --quick" if args.quick else "")
    body = report(
        plan, runs, teacher, cap, missing, command, os.path.relpath(figures, report_path.parent)
    )
    write_report(report_path, body)
    print(body)
    return {
        "runs": runs,
        "capacity": cap,
        "missing": missing,
        "report": report_path,
        "figures": figures,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
