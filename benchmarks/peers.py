"""The same distillation job under taid and under the trainers a user would pick instead:
throughput, peak memory and the held-out result, side by side.

    python benchmarks/peers.py [--steps 20] [--warmup 5] [--objectives fkl,jsd] [--rows ...]

The job (every row): the built-in teacher SmolLM2-135M-Instruct, the quickstart's 6-layer
student cut from it, the quickstart data (``data/quickstart.jsonl``, responses only, at most 192
tokens), 8 sequences per step, AdamW (torch's fused kernel, lr 5e-4, no weight decay,
clipping at 1.0), cosine schedule with 2 warm-up steps, float32, ``--steps`` optimizer steps.
Every row sees the same batches in the same order: the order taid's own loop draws with seed 0
(the Trainer rows read them with a sequential sampler), and the same held-out examples.

Objectives: ``fkl`` (forward KL, KL(teacher || student); generalized JSD with beta 0 in TRL)
and ``jsd`` (generalized JSD with beta 0.5: beta KL(p || m) + (1 - beta) KL(q || m)).

Rows:

- ``taid-train/<implementation>``: taid's own loop (``scripts/train.py``) with
  ``loss.implementation`` auto (the default: the loss from the hidden states and the output
  layer, full logits never formed), chunked (from the logits, chunk by chunk) and eager (plain
  autograd).
- ``taid-train/auto, mixed_precision=auto``: the same with the default precision, bfloat16
  autocast where it is faster than float32 on the CPU or GPU (the other rows are float32).
- ``TAIDTrainer``: taid's loss inside ``transformers.Trainer``.
- ``TRL GKDTrainer``: TRL's GKD trainer with ``lmbda=0`` (dataset responses, no generation).
- ``hand-written Trainer``: a ``transformers.Trainer`` subclass whose ``compute_loss`` is the few
  lines of eager PyTorch a user writes for KL (forward KL only).
- ``TRL DistillationTrainer`` cannot run this job (it trains only on completions it generates);
  its row says so.

Columns: target tokens per second after the warm-up steps (wall time between the end of the
last warm-up step and the end of the last step), peak memory (peak RSS of the process up to the
end of training on CPU; ``torch.cuda.max_memory_allocated`` on CUDA), and the held-out
KL(teacher || student) after the steps, computed by the same few lines of eager code for every
row, so that speed is never bought with a different result. Each row runs in a fresh process,
one after the other; run the command alone (timings on a shared machine vary 10-30%).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
BATCH, LR, WARMUP_LR_STEPS, SEED = 8, 5e-4, 2, 0
OBJECTIVES: dict[str, dict[str, Any]] = {
    "fkl": {"name": "fkl", "beta": 0.0, "title": "forward KL"},
    "jsd": {"name": "jsd", "beta": 0.5, "title": "generalized JSD, beta 0.5"},
}
IMPLEMENTATIONS = ("auto", "chunked", "eager")
PRECISION_ROW = "mixed_precision=auto"
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# --------------------------------------------------------------------------------------------
# The shared job: data in one order, the models, the evaluator
# --------------------------------------------------------------------------------------------
def job_config(out: Path, objective: str, steps: int, *extra: str) -> Any:
    """The taid config of the job (also what the Trainer rows copy their settings from)."""
    from taid.config import load_config

    spec = OBJECTIVES[objective]
    loss = [f"loss.name={spec['name']}"] + (
        [f"loss.beta={spec['beta']}"] if spec["name"] == "jsd" else []
    )
    return load_config(
        CONFIG,
        [
            f"output_dir={out}",
            "overwrite=true",
            f"seed={SEED}",
            f"train.max_steps={steps}",
            f"train.batch_size={BATCH}",
            f"train.lr={LR}",
            f"train.warmup_steps={WARMUP_LR_STEPS}",
            "train.eval_every=0",
            "train.save_every=0",
            "train.mixed_precision=no",
            "log.samples=0",
            "log.progress=false",
            "log.plot=false",
            "log.trackers=[]",
            *loss,
            *extra,
        ],
    )


def job_data(config: Any, tokenizer: Any, steps: int) -> tuple[list[Any], list[Any]]:
    """The examples of the job's ``steps`` batches, in the order taid's loop draws them, and
    the held-out examples."""
    from taid import data as D

    train, held = D.held_out(*D.load_examples(config.data, tokenizer), config.data, config.seed)
    by_number = {ex.ids[0]: ex for ex in train}
    stream = D.BatchStream(train, BATCH, seed=config.seed, pad_id=0, packed=False)
    ordered = [
        by_number[int(i)] for batch in itertools.islice(stream, steps) for i in batch["example_ids"]
    ]
    return ordered, held


def hf_rows(examples: list[Any]) -> list[dict[str, list[int]]]:
    """transformers-style examples: ``labels`` unshifted, -100 where a token is no target."""
    return [
        {
            "input_ids": ex.input_ids,
            "labels": [t if m else -100 for t, m in zip(ex.input_ids, ex.targets)],
        }
        for ex in examples
    ]


def hf_collator(pad_id: int) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Right padding to the longest row, as taid's collator pads."""

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[b, :n] = torch.tensor(r["input_ids"])
            labels[b, :n] = torch.tensor(r["labels"])
            mask[b, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def step_tokens(examples: list[Any]) -> list[int]:
    """Target tokens of each step (a target's position predicts it, so the first token of an
    example is never one)."""
    return [
        sum(sum(ex.targets[1:]) for ex in examples[i : i + BATCH])
        for i in range(0, len(examples), BATCH)
    ]


@torch.no_grad()
def heldout_kl(student: Any, teacher: Any, held: list[Any], pad_id: int) -> float:
    """Token-weighted KL(teacher || student) over the held-out target tokens, in float32 from
    full logits: the same plain code for every row."""
    student.eval()
    device = next(student.parameters()).device
    teacher.to(device)
    total, count = 0.0, 0
    collate = hf_collator(pad_id)
    for i in range(0, len(held), BATCH):
        batch = {k: v.to(device) for k, v in collate(hf_rows(held[i : i + BATCH])).items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s = F.log_softmax(student(**inputs, use_cache=False).logits[:, :-1].float(), -1)
        t = F.log_softmax(teacher(**inputs, use_cache=False).logits[:, :-1].float(), -1)
        mask = batch["labels"][:, 1:] != -100
        kl = (t.exp() * (t - s)).sum(-1)
        total += float(kl[mask].double().sum())
        count += int(mask.sum())
    return total / max(count, 1)


def peak_memory_mb() -> float:
    """Peak memory so far: max allocated on CUDA, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def throughput(ends: list[float], tokens: list[int], warmup: int) -> float:
    """Target tokens per second between the end of step ``warmup`` and the end of the last
    step; ``ends[k]`` is the time step k + 1 ended."""
    if len(ends) <= warmup:
        raise SystemExit(f"--steps must exceed --warmup ({warmup}); got {len(ends)} steps")
    return sum(tokens[warmup : len(ends)]) / (ends[-1] - ends[warmup - 1])


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------
def run_taid(
    objective: str, steps: int, warmup: int, overrides: list[str], out: Path
) -> dict[str, Any]:
    """taid's own loop, as ``scripts/train.py`` runs it."""
    from taid import trainer as TR

    config = job_config(out, objective, steps, *overrides)
    result = TR.train(config)
    memory = peak_memory_mb()
    rows = [r for r in TR.read_metrics(out / "metrics.jsonl") if "loss" in r]
    # each row logs its tokens and the loop's cumulative tokens/s: their ratio is the time
    # from the loop's start to the end of that step
    seen = list(itertools.accumulate(r["tokens"] for r in rows))
    ends = [n / r["tokens_per_s"] for n, r in zip(seen, rows)]
    s = result["setup"]
    student = s.accelerator.unwrap_model(s.student)
    _, held = job_data(config, s.tokenizer, 0)
    return {
        "tokens_per_s": throughput(ends, [r["tokens"] for r in rows], warmup),
        "memory_mb": memory,
        "kl": heldout_kl(student, s.teacher, held, s.tokenizer.pad_token_id),
    }


class _StepClock:
    """A TrainerCallback recording when each optimizer step ends."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def hook(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                clock.ends.append(time.perf_counter())
                return control

        return Clock()


def _hf_args(cls: Any, out: Path, steps: int, **extra: Any) -> Any:
    """The job's optimisation settings in transformers' (or TRL's) argument class."""
    return cls(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=WARMUP_LR_STEPS,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",  # torch.optim.AdamW(fused=True), as taid uses
        seed=SEED,
        train_sampling_strategy="sequential",
        dataloader_drop_last=True,
        logging_steps=steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        **extra,
    )


def _hf_models(objective: str, steps: int, out: Path) -> tuple[Any, Any, Any, list[Any], list[Any]]:
    from taid import models as M

    config = job_config(out, objective, steps)
    teacher, tokenizer, student = M.load_builtin(student_layers=config.student.layers)
    ordered, held = job_data(config, tokenizer, steps)
    return teacher, tokenizer, student, ordered, held


def run_hf(row: str, objective: str, steps: int, warmup: int, out: Path) -> dict[str, Any]:
    """A transformers.Trainer-based row: TAIDTrainer, TRL's GKDTrainer, or the hand-written
    loop."""
    import datasets

    teacher, tokenizer, student, ordered, held = _hf_models(objective, steps, out)
    dataset = datasets.Dataset.from_list(hf_rows(ordered))
    collate = hf_collator(tokenizer.pad_token_id)
    clock = _StepClock()
    common = dict(train_dataset=dataset, data_collator=collate, callbacks=[clock.hook()])
    spec = OBJECTIVES[objective]
    if row == "TAIDTrainer":
        from transformers import TrainingArguments

        from taid.integrations.transformers import TAIDTrainer

        kwargs = {"beta": spec["beta"]} if spec["name"] == "jsd" else {}
        trainer: Any = TAIDTrainer(
            model=student,
            teacher_model=teacher,
            args=_hf_args(TrainingArguments, out, steps),
            loss=spec["name"],
            loss_kwargs=kwargs,
            **common,
        )
    elif row == "TRL GKDTrainer":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = _hf_args(
            GKDConfig,
            out,
            steps,
            lmbda=0.0,
            beta=spec["beta"],
            seq_kd=False,
            max_length=None,
            bf16=False,  # GKDConfig defaults to bf16; the job is float32
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = GKDTrainer(
            model=student, teacher_model=teacher, args=args, processing_class=tokenizer, **common
        )
    else:  # the hand-written loop
        from transformers import TrainingArguments

        trainer = hand_written_trainer()(
            model=student, args=_hf_args(TrainingArguments, out, steps), teacher=teacher, **common
        )
    trainer.train()
    memory = peak_memory_mb()
    return {
        "tokens_per_s": throughput(clock.ends, step_tokens(ordered), warmup),
        "memory_mb": memory,
        "kl": heldout_kl(trainer.model, teacher, held, tokenizer.pad_token_id),
    }


def hand_written_trainer() -> type:
    """What a user writes for KD on transformers.Trainer: forward KL from full logits."""
    from transformers import Trainer

    class KDTrainer(Trainer):
        def __init__(self, *args: Any, teacher: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.teacher = teacher.eval()
            self.model_accepts_loss_kwargs = True  # we divide by num_items_in_batch ourselves

        def compute_loss(
            self,
            model: Any,
            inputs: Any,
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            with torch.no_grad():
                teacher_logits = self.teacher.to(outputs.logits.device)(**inputs).logits
            student_logp = F.log_softmax(outputs.logits[:, :-1], dim=-1)
            teacher_logp = F.log_softmax(teacher_logits[:, :-1], dim=-1)
            kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)
            mask = labels[:, 1:] != -100
            loss = (kl * mask).sum() / (num_items_in_batch or mask.sum())
            return (loss, outputs) if return_outputs else loss

    return KDTrainer


def rows_for(objective: str) -> dict[str, Callable[[int, int, Path], dict[str, Any]] | str]:
    """Each row's runner, or the reason it cannot run ``objective``."""
    rows: dict[str, Callable[[int, int, Path], dict[str, Any]] | str] = {}
    for impl in IMPLEMENTATIONS:
        overrides = [f"loss.implementation={impl}"]
        rows[f"taid-train/{impl}"] = lambda n, w, o, x=overrides: run_taid(objective, n, w, x, o)
    # the default precision (bf16 autocast where it is faster than float32)
    rows[f"taid-train/auto, {PRECISION_ROW}"] = lambda n, w, o: run_taid(
        objective, n, w, ["train.mixed_precision=auto"], o
    )
    for row in ("TAIDTrainer", "TRL GKDTrainer", "hand-written Trainer"):
        rows[row] = lambda n, w, o, row=row: run_hf(row, objective, n, w, o)
    if objective != "fkl":
        rows["hand-written Trainer"] = "not run: the hand-written loop computes forward KL only"
    rows["TRL DistillationTrainer"] = (
        "cannot run this job: it trains only on completions it generates (on-policy); "
        "it has no mode for the dataset's responses"
    )
    return rows


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    """One row in this process; its result as JSON on the last line of stdout."""
    runner = rows_for(args.objective)[args.child]
    assert callable(runner)
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        result = runner(args.steps, args.warmup, Path(tmp))
    print(json.dumps(result))


def spawn(row: str, objective: str, steps: int, warmup: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        row,
        "--objective",
        objective,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **ENV})
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        return {"error": lines[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict[str, dict[str, dict[str, Any] | str]]) -> str:
    """Markdown: one table per objective, ratios to the fastest row of that objective."""
    lines = []
    for objective, rows in results.items():
        done = [r for r in rows.values() if isinstance(r, dict) and "tokens_per_s" in r]
        best = max((r["tokens_per_s"] for r in done), default=float("nan"))
        lines += [
            f"\n**{objective}** ({OBJECTIVES[objective]['title']})\n",
            "| row | target tokens/s | x fastest | peak memory MiB | held-out KL |",
            "|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            if isinstance(r, str) or "error" in r:
                why = r if isinstance(r, str) else f"failed: {r['error']}"
                lines.append(f"| {name} | {why} | | | |")
                continue
            lines.append(
                f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / best:.2f} | "
                f"{r['memory_mb']:.0f} | {r['kl']:.4f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--objectives", default="fkl,jsd")
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--objective", default="fkl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args)
        return
    from taid.hardware import describe_device

    print(describe_device())
    command = " ".join(["python benchmarks/peers.py", *sys.argv[1:]])
    print(command)
    wanted = None if args.rows is None else set(args.rows.split(","))
    results: dict[str, dict[str, dict[str, Any] | str]] = {}
    for objective in args.objectives.split(","):
        if objective not in OBJECTIVES:
            raise SystemExit(f"unknown objective {objective!r}; known: {sorted(OBJECTIVES)}")
        results[objective] = {}
        for name, runner in rows_for(objective).items():
            if wanted is not None and name not in wanted:
                continue
            start = time.perf_counter()
            r = (
                runner
                if isinstance(runner, str)
                else spawn(name, objective, args.steps, args.warmup)
            )
            results[objective][name] = r
            print(f"  {objective} {name}: {r} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(table(results))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {"device": describe_device(), "command": command, "results": results}, indent=1
            )
        )


if __name__ == "__main__":
    main()
