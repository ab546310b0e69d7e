"""The training loop: one readable function over accelerate.

Per optimizer step: take ``grad_accum`` micro-batches, count their valid tokens across all
micro-batches and ranks first, then backpropagate each micro-batch's summed loss divided by
that count (times the number of ranks, since DDP averages gradients). The TAID schedule steps
once, on the token-weighted loss of the whole step, identical on every rank.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from taid import cache as T
from taid import checkpoint as CK
from taid import chunked as C
from taid import data as D
from taid import hardware as H
from taid import models as M
from taid import sources as S
from taid import student_data as SD
from taid.config import Config, ConfigError, dump, first_difference, to_dict
from taid.functional import resolve_vocab
from taid.losses import DistillationLoss, build_loss, loss_parameters

# Keys that do not change what a run computes: a run may be resumed with other values, and
# from another place (a moved or copied output_dir).
_IGNORED_CONFIG_KEYS = {
    ("output_dir",),
    ("resume",),
    ("overwrite",),
    ("log",),
    ("train", "eval_every"),
    ("train", "eval_batches"),
    ("train", "save_every"),
    ("train", "keep_checkpoints"),
    ("train", "log_every"),
    ("train", "num_workers"),
    ("teacher", "cache_dir"),
    ("cache", "overwrite"),
    ("cache", "batch_size"),
}


@dataclass
class TrainState:
    """What besides the modules a checkpoint must restore."""

    step: int = 0
    data: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "batch": 0})

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "data": dict(self.data)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.data = dict(state["data"])


# --------------------------------------------------------------------------------------------
# Checkpoints (the format is in taid.checkpoint)
# --------------------------------------------------------------------------------------------
def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir/checkpoints``, oldest first."""
    return CK.list_checkpoints(output_dir / "checkpoints")


def run_identity(config: Config) -> dict[str, Any]:
    """What a checkpoint records of its run, compared on resume: the config without the keys
    that do not change the result (:data:`_IGNORED_CONFIG_KEYS`), with
    ``train.mixed_precision`` the precision the run uses (``auto`` names none: a run begun in
    bfloat16 on one kind of CPU must not be finished in float32 on another)."""
    out = json.loads(json.dumps(to_dict(config)))
    for path in _IGNORED_CONFIG_KEYS:
        node = out
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)
    out["train"]["mixed_precision"] = _used_precision(config)
    return {"config": out}


def _used_precision(config: Config) -> str:
    """The autocast precision a run uses: :func:`run_precision`, or under ``accelerate
    launch`` with ``auto`` the launch config's."""
    return run_precision(config) or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


def _check_same_run(checkpoint: Path, config: Config) -> None:
    saved = CK.manifest_of(checkpoint).get("run", {}).get("config")
    now = run_identity(config)["config"]
    train = (saved or {}).get("train", {})
    if train.get("mixed_precision") == "auto":  # written before the precision was recorded
        train["mixed_precision"] = now["train"]["mixed_precision"]
    if saved != now:
        raise ConfigError(
            f"checkpoint {checkpoint} was written by a run with a different config "
            f"({_describe(first_difference(saved, now))}); resume with the same settings, use "
            f"another output_dir, or overwrite=true to start over"
        )


def _describe(diff: tuple[str, Any, Any] | None) -> str:
    if diff is None:
        return "no difference"
    key, saved, now = diff
    return f"{key}: saved {saved!r}, now {now!r}"


def check_output_dir(config: Config) -> Path | None:
    """Refuse to mix runs in one output_dir; return the checkpoint to resume from, if any.

    Every process calls it before any model is built, so that a refusal costs nothing.
    """
    out = Path(config.output_dir)
    root = out / "checkpoints"
    CK.recover(out)
    CK.recover(root)
    if config.resume not in ("auto", False):
        path = Path(str(config.resume))
        _check_same_run(path, config)
        return path
    found = (
        sorted(
            (p for p in root.iterdir() if p.is_dir() and CK.step_of(p) is not None),
            key=lambda p: CK.step_of(p) or 0,
        )
        if root.is_dir()
        else []
    )
    if not found:
        return None
    if config.overwrite:
        shutil.rmtree(root, ignore_errors=True)
        return None
    if config.resume is False:
        raise ConfigError(
            f"output_dir {str(out)!r} already holds checkpoints; use resume=auto "
            f"to continue, another output_dir, or overwrite=true to start over"
        )
    complete = [p for p in found if CK.is_complete(p)]
    if not complete:
        CK.verify(found[-1])  # raises why: an old format, or incomplete
    _check_same_run(complete[-1], config)
    return complete[-1]


def save_checkpoint(s: Setup, state: TrainState) -> Path:
    """Write ``output_dir/checkpoints/step-N`` (atomic, checksummed; see taid.checkpoint) and
    keep the newest ``train.keep_checkpoints``."""
    return CK.save(
        s.accelerator,
        Path(s.config.output_dir) / "checkpoints",
        state.step,
        model=s.student,
        optimizer=s.optimizer,
        scheduler=s.scheduler,
        loss=s.loss_fn,
        loss_optimizer=s.loss_optimizer,
        train_state={
            **state.state_dict(),
            "student_data": None if s.student_data is None else s.student_data.state_dict(),
        },
        run=run_identity(s.config),
        keep=s.config.train.keep_checkpoints,
        rank_state={} if s.student_data is None else s.student_data.rank_state_dict(),
    )


def load_checkpoint(s: Setup, path: Path, state: TrainState) -> Path:
    """Restore ``path`` into the setup and ``state``. With ``resume=auto``, a checkpoint that
    fails its checks falls back to older complete ones, loudly; when none loads, stop."""
    acc = s.accelerator
    candidates = [path]
    if s.config.resume == "auto":
        candidates += [p for p in reversed(checkpoints(Path(s.config.output_dir))) if p != path]
    errors = []
    for candidate in candidates:
        try:
            loaded = CK.load(
                acc,
                candidate,
                model=s.student,
                optimizer=s.optimizer,
                scheduler=s.scheduler,
                loss=s.loss_fn,
                loss_optimizer=s.loss_optimizer,
            )
            state.load_state_dict(loaded)
            if s.student_data is not None:
                s.student_data.load_state_dict(loaded["student_data"])
                if loaded["rank"]:
                    s.student_data.load_rank_state_dict(loaded["rank"])
                else:
                    acc.print(
                        "warning: the number of processes changed; the replay buffer "
                        "of student generations starts empty"
                    )
            return candidate
        except (CK.CheckpointError, RuntimeError, ValueError, KeyError, OSError) as e:
            errors.append(f"{candidate}: {e}")
            acc.print(
                f"warning: checkpoint {candidate} could not be loaded ({e})"
                + ("; trying an older one" if candidate != candidates[-1] else "")
            )
    raise CK.CheckpointError(
        "no checkpoint could be loaded, so the run stops instead of starting again from step "
        "0:\n" + "\n".join(errors) + "\nuse overwrite=true to start over"
    )


# --------------------------------------------------------------------------------------------
# Loss on a batch
# --------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """Everything the loop uses, built once."""

    accelerator: Any
    config: Config
    tokenizer: Any
    teacher: Any
    student: Any
    loss_fn: DistillationLoss
    fused: bool
    teacher_fused: bool
    train_examples: list[D.Example]
    eval_examples: list[D.Example]
    vocab_size: int | None
    optimizer: Any = None
    scheduler: Any = None
    cache: T.TeacherCache | None = None
    loss_optimizer: Any = None
    """AdamW over the loss's own parameters (CTKD's temperature), or None."""
    student_data: SD.StudentData | None = None
    """Student-generated responses (``student_data`` section), or None."""


def step_loss_parameters(s: Setup) -> None:
    """One optimizer step of the loss's own parameters. DDP does not see them (they are not
    the student's), so their gradients are averaged over the ranks here, as DDP averages the
    student's; every rank then holds the same values."""
    assert s.loss_optimizer is not None
    for p in s.loss_fn.parameters():
        if p.grad is not None and s.accelerator.num_processes > 1:
            p.grad = s.accelerator.reduce(p.grad, reduction="mean")
    s.loss_optimizer.step()
    s.loss_optimizer.zero_grad(set_to_none=True)


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """What the models take from a collated batch (not the labels or the example numbers)."""
    return {k: v for k, v in batch.items() if k not in ("labels", "example_ids")}


def teacher_source(s: Setup, batch: dict[str, Tensor]) -> S.TeacherSource:
    """The teacher for one batch, as a source of logit rows: read from the cache, or the
    model's last hidden states with its output layer (logits rebuilt chunk by chunk), or its
    logits."""
    if s.cache is not None:
        return s.cache.source(batch["example_ids"], batch["labels"])
    return S.from_model(
        s.teacher,
        model_inputs(batch),
        fused=s.teacher_fused,
        unwrapped=s.accelerator.unwrap_model(s.teacher),
    )


def batch_loss(
    s: Setup,
    batch: dict[str, Tensor],
    loss_fn: DistillationLoss,
    teacher: S.TeacherSource | None = None,
) -> Any:
    """The summed loss of one micro-batch (``reduction="sum"``) with its parts; ``teacher``
    is computed here when not given.

    Everything runs under the run's autocast (``train.mixed_precision``): the student, the
    teacher (not prepared by accelerate, so not wrapped) and the loss's products with the
    output layer; the loss's softmax arithmetic stays float32."""
    labels, inputs, acc = batch["labels"], model_inputs(batch), s.accelerator
    with acc.autocast():
        if loss_fn.divergence is not None and teacher is None:
            teacher = teacher_source(s, batch)
        if s.fused:
            hidden = M.final_hidden(s.student, acc.unwrap_model(s.student), **inputs)
            weight, bias = M.plain_linear_head(acc.unwrap_model(s.student))
            return loss_fn.compute_fused(hidden, weight, teacher, labels, student_bias=bias)
        logits = s.student(**inputs, use_cache=False).logits
        return loss_fn.compute(logits, teacher, labels)


@torch.no_grad()
def evaluate(s: Setup) -> dict[str, float]:
    """Held-out metrics, token-weighted over all ranks: the distillation loss at the current
    t, KL(teacher || student), the student's cross-entropy and perplexity on the labels, and
    the teacher's."""
    acc = s.accelerator
    if not s.eval_examples:
        return {}
    s.student.eval()
    common = dict(
        reduction="sum",
        vocab_size=s.vocab_size,
        implementation="chunked" if s.loss_fn.implementation != "eager" else "eager",
    )
    kl_fn = build_loss("fkl", **common)
    ce_fn = build_loss("sft", **common)
    totals = torch.zeros(5, dtype=torch.float64, device=acc.device)
    batches = D.eval_batches(
        s.eval_examples,
        s.config.train.batch_size,
        s.tokenizer.pad_token_id,
        s.config.data.packing,
        rank=acc.process_index,
        world_size=acc.num_processes,
        limit=s.config.train.eval_batches,
    )
    has_teacher = s.teacher is not None or s.cache is not None
    with acc.autocast():
        _evaluate_batches(s, batches, has_teacher, kl_fn, ce_fn, totals)
    totals = acc.reduce(totals, reduction="sum")
    s.student.train()
    n = max(totals[0].item(), 1.0)
    metrics = {
        "eval/student_ce": totals[1].item() / n,
        "eval/student_ppl": math.exp(min(totals[1].item() / n, 50.0)),
        "eval/tokens": totals[0].item(),
    }
    if has_teacher:
        if s.loss_fn.divergence is not None:
            metrics["eval/distill"] = totals[2].item() / n
        metrics.update(
            {
                "eval/kl_teacher_student": totals[3].item() / n,
                "eval/teacher_ce": totals[4].item() / n,
                "eval/teacher_ppl": math.exp(min(totals[4].item() / n, 50.0)),
            }
        )
    if hasattr(s.loss_fn, "t"):
        metrics["eval/t"] = s.loss_fn.t
    return metrics


def _evaluate_batches(
    s: Setup,
    batches: Any,
    has_teacher: bool,
    kl_fn: DistillationLoss,
    ce_fn: DistillationLoss,
    totals: Tensor,
) -> None:
    """Add each held-out batch's sums to ``totals``: target tokens, student cross-entropy,
    distillation loss, KL(teacher || student), teacher cross-entropy."""
    for batch in batches:
        batch = {k: v.to(s.accelerator.device) for k, v in batch.items()}
        labels = batch["labels"]
        logits = s.student(**model_inputs(batch), use_cache=False).logits
        ce = ce_fn.compute(logits, None, labels)
        totals[0] += ce.num_tokens
        totals[1] += ce.loss.double()
        if has_teacher:
            _teacher_terms(s, logits, teacher_source(s, batch), labels, kl_fn, totals)


def _teacher_terms(
    s: Setup,
    logits: Tensor,
    source: S.TeacherSource,
    labels: Tensor,
    kl_fn: DistillationLoss,
    totals: Tensor,
) -> None:
    """The batch's distillation loss, KL(teacher || student) and teacher cross-entropy in one
    pass over the teacher: each chunk of target rows is formed once (from the cache, or from
    hidden states and the output layer) and scored three ways. Every loss is a sum over
    tokens, so the chunks' sums add up to the batch's."""
    width = resolve_vocab(logits.shape[-1], source.width, s.vocab_size)
    student_rows = logits.reshape(-1, logits.shape[-1])
    for rows, y in C.valid_chunks(labels, width, D.IGNORE_INDEX):
        teacher = S.LogitsTeacher(source.rows(rows, width))
        z = student_rows.index_select(0, rows)
        distill = s.loss_fn.compute(z, teacher, y).distill
        if distill is not None:
            totals[2] += distill.double()
        totals[3] += kl_fn.compute(z, teacher, y).loss.double()
        totals[4] += T.teacher_cross_entropy(teacher, y, width)


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------
def build(config: Config) -> Setup:
    """Accelerator, models, tokenizer, data and loss, with every check before training.

    The steps run in the order that makes mistakes cheap: the data and a teacher cache are
    checked before any model is loaded.
    """
    D.check_local_path(config.data)  # before any process group, tokenizer or model
    accelerator = _setup_accelerator(config)
    tokenizer = M.run_tokenizer(config)
    train_examples, eval_examples, all_examples = _setup_data(config, tokenizer)
    cache = _setup_cache(config, tokenizer, all_examples)
    teacher, student, vocab = _setup_models(config, tokenizer, cache)
    vocab_size = _shared_vocab(teacher, student, vocab, cache)
    _check_token_ids(teacher, student, vocab, train_examples + eval_examples)
    fused, teacher_fused = _loss_path(config, accelerator, teacher, student)
    loss_fn = _setup_loss(config, vocab_size)
    loss_optimizer = _loss_optimizer(config, accelerator, loss_fn)
    student_data = _setup_student_data(config, tokenizer, student)
    if config.data.packing:
        train_examples = D.pack(train_examples, config.data.max_length)
        eval_examples = D.pack(eval_examples, config.data.max_length)
    student, teacher, optimizer, scheduler = _prepare(config, accelerator, student, teacher)
    return Setup(
        accelerator,
        config,
        tokenizer,
        teacher,
        student,
        loss_fn,
        fused,
        teacher_fused,
        train_examples,
        eval_examples,
        vocab_size,
        optimizer,
        scheduler,
        cache,
        loss_optimizer,
        student_data,
    )


def _sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def run_precision(config: Config) -> str | None:
    """The autocast precision of this run: ``train.mixed_precision``, with ``auto`` resolved
    by :func:`taid.hardware.resolve_precision`, or left to the launch config (None) under
    ``accelerate launch``, whose ``mixed_precision`` then applies."""
    requested = config.train.mixed_precision
    if requested == "auto" and "ACCELERATE_MIXED_PRECISION" in os.environ:
        return None
    return H.resolve_precision(requested)


def _setup_accelerator(config: Config) -> Any:
    """The Accelerator, refused when it does not run the requested mode; seeds everything."""
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

    trackers = config.log.trackers
    if trackers is None:
        trackers = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    accelerator = M.make_accelerator(
        config.train.collective_timeout_s,
        # The LR schedule counts optimizer steps; accelerate would otherwise step it once per
        # process each step (it assumes a per-process sharded dataloader).
        step_scheduler_with_optimizer=False,
        mixed_precision=run_precision(config),
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / "logs")
        ),
    )
    M.check_distribution(accelerator)
    if config.train.mixed_precision == "auto":
        accelerator.print(
            f"train.mixed_precision=auto: {accelerator.mixed_precision} on {H.describe_device()}"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED and config.train.save_every:
        raise ConfigError(
            "train.save_every: checkpoints are not supported under DeepSpeed (its "
            "engine keeps the optimizer state in its own pickled format, which "
            "taid never loads); set train.save_every=0, or use FSDP"
        )
    set_seed(config.seed)
    return accelerator


def _setup_data(
    config: Config, tokenizer: Any
) -> tuple[list[D.Example], list[D.Example], list[D.Example]]:
    """Training and held-out examples, and all examples in the cache's numbering. Data come
    first: their errors (missing file, empty, too long) cost no model loading."""
    train_examples, eval_examples = D.load_examples(config.data, tokenizer)
    all_examples = train_examples + eval_examples
    train_examples, eval_examples = D.held_out(
        train_examples, eval_examples, config.data, config.seed
    )
    return train_examples, eval_examples, all_examples


def _setup_cache(
    config: Config, tokenizer: Any, examples: list[D.Example]
) -> T.TeacherCache | None:
    """The teacher cache, checked against this run's tokenizer and data before any model
    loads (with loss sft it only serves the held-out metrics: KL to the teacher, its
    perplexity)."""
    if config.teacher.source != "cache":
        return None
    assert config.teacher.cache_dir, "validated: teacher.source=cache needs teacher.cache_dir"
    cache = T.TeacherCache(config.teacher.cache_dir)
    run = T.identity(config, tokenizer, examples, cache.vocab_size)
    run["vocab_size"] = None  # checked against the student in _shared_vocab
    cache.check(run)
    return cache


def _setup_models(
    config: Config, tokenizer: Any, cache: T.TeacherCache | None
) -> tuple[Any, Any, int]:
    """Teacher (None when not needed), student and the run's vocabulary length. With a cache
    the teacher is loaded only to cut the student from it."""
    teacher = None
    needs_teacher = config.loss.name != "sft" and cache is None
    if needs_teacher or config.student.init == "teacher_layers":
        # Its random draws (a teacher built from an architecture) must not shift the student's,
        # so that a run from a cache initialises the student as the run beside the teacher.
        with torch.random.fork_rng(devices=[]):
            teacher = M.freeze(M.load_model(config.teacher))
        if cache is not None:
            cache.check({}, teacher_weights_sha256=T.weights_hash(teacher))
    s_cfg = config.student
    vocab = len(tokenizer)
    if s_cfg.init == "teacher_layers":
        assert teacher is not None and s_cfg.layers is not None  # validated
        student = M.student_from_teacher_layers(
            teacher,  # type: ignore[arg-type]
            s_cfg.layers,
            s_cfg.dtype,
        )
    else:
        student = M.load_model(s_cfg)
        if s_cfg.init == "pretrained":
            source = s_cfg.tokenizer or s_cfg.name_or_path
            assert source is not None  # validated: a pretrained student names its weights
            vocab = M.check_tokenizers(tokenizer, M.load_tokenizer(source, s_cfg.trust_remote_code))
    return (teacher if needs_teacher else None), student, vocab


def _shared_vocab(
    teacher: Any, student: Any, vocab: int, cache: T.TeacherCache | None
) -> int | None:
    """The width both sides are sliced to; a cache must cover the run's vocabulary."""
    vocab_size = M.shared_vocab_size(teacher, student, vocab)
    if cache is None:
        return vocab_size
    if vocab != cache.vocab_size and (cache.mode == "topk" or vocab > cache.vocab_size):
        raise T.CacheError(
            f"teacher cache {cache.root}: vocab_size differs (cache: {cache.vocab_size}, "
            f"this run distils over {vocab} ids); a {cache.mode} cache serves a run over "
            f"{'exactly its' if cache.mode == 'topk' else 'at most its'} vocabulary: "
            f"rewrite it with this run's tokenizer"
        )
    return vocab


def _check_token_ids(teacher: Any, student: Any, vocab: int, examples: list[D.Example]) -> None:
    rows_in = min(
        m.get_input_embeddings().weight.shape[0] for m in (teacher, student) if m is not None
    )
    top = max(max(ex.input_ids) for ex in examples)
    if top >= min(rows_in, vocab):
        raise ConfigError(
            f"the data has token id {top}, beyond the shared vocabulary "
            f"({vocab}) or an embedding ({rows_in} rows); tokenize with the "
            f"smaller model's tokenizer (teacher.tokenizer)"
        )


def _loss_path(config: Config, accelerator: Any, teacher: Any, student: Any) -> tuple[bool, bool]:
    """Whether the student's loss is fused with its output layer, and whether the teacher's
    logits are rebuilt from its hidden states (both need a plain, unsharded linear head)."""
    impl = config.loss.implementation
    fused_ok = not _sharded(accelerator)
    if fused_ok and not M.has_plain_linear_head(student):
        if impl == "fused":
            try:
                M.plain_linear_head(student)
            except ValueError as e:  # the reason, in the config's terms
                raise ConfigError(f"loss.implementation=fused: {e}") from None
        fused_ok = False
    elif not fused_ok and impl == "fused":
        raise ConfigError(
            "loss.implementation=fused needs an unsharded output layer; under "
            "FSDP or DeepSpeed use chunked"
        )
    fused = impl == "fused" or (impl == "auto" and fused_ok)
    # (fused implies unsharded)
    teacher_fused = teacher is not None and fused and M.has_plain_linear_head(teacher)
    return fused, teacher_fused


def _setup_loss(config: Config, vocab_size: int | None) -> DistillationLoss:
    loss_kwargs = dict(config.loss.params)
    loss_kwargs.setdefault("vocab_size", vocab_size)
    if "total_steps" in loss_parameters(config.loss.name):  # a schedule over the run
        loss_kwargs["total_steps"] = config.train.max_steps
    impl = "eager" if config.loss.implementation == "eager" else "chunked"
    return build_loss(config.loss.name, reduction="sum", implementation=impl, **loss_kwargs)


def _setup_student_data(config: Config, tokenizer: Any, student: Any) -> SD.StudentData | None:
    """The student-data machinery when ``student_data`` is on; generation stops at the
    tokenizer's and the student's end-of-sequence tokens."""
    if not config.student_data.enabled():
        return None
    eos = {tokenizer.eos_token_id}
    configured = getattr(getattr(student, "generation_config", None), "eos_token_id", None)
    eos.update(configured if isinstance(configured, list) else [configured])
    return SD.StudentData(
        config.student_data,
        seed=config.seed,
        total_steps=config.train.max_steps,
        pad_id=tokenizer.pad_token_id,
        eos_ids=sorted(int(i) for i in eos if i is not None),
        max_length=config.data.max_length,
    )


def _loss_optimizer(config: Config, accelerator: Any, loss_fn: DistillationLoss) -> Any:
    """AdamW over the loss's own parameters (CTKD's temperature), with the run's learning rate
    and betas and no weight decay; None for losses without parameters."""
    params = list(loss_fn.parameters())
    if not params:
        return None
    loss_fn.to(accelerator.device)
    betas = (config.train.betas[0], config.train.betas[1])
    return torch.optim.AdamW(params, lr=config.train.lr, betas=betas, weight_decay=0.0)


def _prepare(
    config: Config, accelerator: Any, student: Any, teacher: Any
) -> tuple[Any, Any, Any, Any]:
    """Optimizer and LR schedule; devices, precision and distribution through accelerate."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(
        student.parameters(),
        lr=config.train.lr,
        betas=(config.train.betas[0], config.train.betas[1]),
        weight_decay=config.train.weight_decay,
        # one kernel over all parameters: 6x faster than the per-parameter loop on CPU (the
        # quickstart student: 0.02 s against 0.14 s a step); sharded parameters keep the loop
        fused=not _sharded(accelerator) or None,
    )
    scheduler = get_scheduler(
        config.train.lr_scheduler,
        optimizer,
        num_warmup_steps=config.train.warmup_steps,
        num_training_steps=config.train.max_steps,
    )
    if config.train.compile:
        for model in (student, teacher):
            if model is not None:
                M.compile_layers(model)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    if teacher is not None:
        if _sharded(accelerator):  # shard the teacher like the student, not one per rank
            teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
        else:  # frozen and replicated: just moved (and never in a checkpoint)
            teacher = teacher.to(accelerator.device)
    return student, teacher, optimizer, scheduler


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def train(config: Config) -> dict[str, Any]:
    """Run a distillation from a validated config; returns the final metrics."""
    resume_from = check_output_dir(config)
    finished = finished_run(config, resume_from)
    if finished is not None:
        return finished
    s = build(config)
    state, stream, metrics_path = _open_run(s, resume_from)
    before = evaluate(s) if state.step == 0 else {}
    if before:
        _log(s.accelerator, metrics_path, {"step": 0, **before})
    samples, prompts = _samples_before(s) if state.step == 0 else ([], [])
    _train_steps(s, state, stream, metrics_path)
    return _finish(s, state, metrics_path, before, samples, prompts)


def _open_run(s: Setup, resume_from: Path | None) -> tuple[TrainState, D.BatchStream, Path]:
    """The run's state and data stream, restored from ``resume_from`` when given; the output
    folder with the config, the metrics file cut back to the restored step, the trackers."""
    config, acc = s.config, s.accelerator
    out_dir = Path(config.output_dir)
    state = TrainState()
    stream = D.BatchStream(
        s.train_examples,
        config.train.batch_size,
        seed=config.seed,
        pad_id=s.tokenizer.pad_token_id,
        packed=config.data.packing,
        rank=acc.process_index,
        world_size=acc.num_processes,
    )
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump(config))
    if resume_from is not None:
        loaded = load_checkpoint(s, resume_from, state)
        stream.load_state_dict(state.data)
        acc.print(f"resumed from {loaded} at step {state.step}")
    if acc.is_main_process:  # rows after the checkpoint (or all, from step 0) are redone
        restart_metrics(out_dir, state.step)
    acc.init_trackers(config.log.project, config=_flat(to_dict(config)))
    return state, stream, out_dir / "metrics.jsonl"


def _samples_before(s: Setup) -> tuple[list[dict[str, str]], list[list[int]]]:
    """``log.samples`` held-out prompts (main process) and the teacher's and the untrained
    student's greedy answers to them; the trained student's are added by :func:`_finish`."""
    config, acc = s.config, s.accelerator
    if not config.log.samples or not acc.is_main_process:
        return [], []
    prompts = sample_prompts(s.eval_examples or s.train_examples, config.log.samples)
    samples = []
    for prompt in prompts:
        row = {"prompt": s.tokenizer.decode(prompt)}
        if s.teacher is not None:
            row["teacher"] = greedy(
                acc.unwrap_model(s.teacher), s.tokenizer, prompt, config.log.sample_tokens
            )
        row["student_before"] = greedy(
            acc.unwrap_model(s.student), s.tokenizer, prompt, config.log.sample_tokens
        )
        samples.append(row)
    return samples, prompts


def _train_steps(s: Setup, state: TrainState, stream: D.BatchStream, metrics_path: Path) -> None:
    """Optimizer steps from ``state.step`` to ``train.max_steps``: each logged, and the
    held-out evaluation and checkpoints at their intervals."""
    config, acc, cfg = s.config, s.accelerator, s.config.train
    progress = None
    if config.log.progress and acc.is_local_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.max_steps, initial=state.step, desc="distil", dynamic_ncols=True)
    batches = iter(stream)
    s.student.train()
    tokens_seen, t_start = 0, time.perf_counter()
    while state.step < cfg.max_steps:
        step_start = time.perf_counter()
        micro, kinds, cached = _next_micro_batches(s, batches, state.step)
        data_s = time.perf_counter() - step_start
        sums, global_tokens, grad_norm = _optimizer_step(s, micro, cached, state.step)
        schedule = s.loss_fn.advance(sums[1])
        state.step += 1
        state.data = stream.state_dict()
        tokens_seen += global_tokens
        record = {
            "step": state.step,
            "loss": sums[0],
            "lr": s.scheduler.get_last_lr()[0],
            "tokens": global_tokens,
            "tokens_per_s": tokens_seen / max(time.perf_counter() - t_start, 1e-9),
            "step_s": time.perf_counter() - step_start,
            "data_s": data_s,
            **_step_terms(s, sums, grad_norm, schedule, kinds),
        }
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            _log(acc, metrics_path, record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(
                loss=f"{sums[0]:.4f}",
                t=f"{schedule.get('t', 0):.3f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
            )
        _at_intervals(s, state, metrics_path)
    if progress is not None:
        progress.close()


def _next_micro_batches(
    s: Setup, batches: Iterator[dict[str, Tensor]], step: int
) -> tuple[list[dict[str, Tensor]], list[str], list[S.TeacherSource | None]]:
    """The step's ``grad_accum`` micro-batches on the device (with the student's own responses
    where the recipe asks), what kind each is, and their cached teacher rows (read here, so
    that the step's data time includes them)."""
    acc = s.accelerator
    micro, kinds = [], []
    for i in range(s.config.train.grad_accum):
        batch = {k: v.to(acc.device) for k, v in next(batches).items()}
        if s.student_data is not None:  # the student's own responses to these prompts
            batch, kind = s.student_data.batch(
                acc.unwrap_model(s.student), batch, step, i, synced=_sharded(acc)
            )
            kinds.append(kind)
        micro.append(batch)
    cached = [
        teacher_source(s, b) if s.cache is not None and s.loss_fn.divergence else None
        for b in micro
    ]
    return micro, kinds, cached


def _optimizer_step(
    s: Setup,
    micro: list[dict[str, Tensor]],
    cached: list[S.TeacherSource | None],
    step: int,
) -> tuple[list[float], int, Tensor | None]:
    """Forward and backward over the micro-batches, clipping, the optimizer and LR steps.

    Every loss is a sum over tokens divided by the valid tokens of the whole optimizer step
    (all micro-batches, all ranks), so the gradient is that of the step's token mean whatever
    the split. Returns the step's token means of (loss, distillation term, cross-entropy),
    identical on every rank, the step's valid tokens and the gradient norm before clipping."""
    acc, cfg = s.accelerator, s.config.train
    ignore = s.loss_fn.ignore_index  # == D.IGNORE_INDEX, what the collator writes
    local_tokens = sum(int((b["labels"] != ignore).sum()) for b in micro)
    global_tokens = int(
        acc.reduce(torch.tensor(local_tokens, device=acc.device), reduction="sum").item()
    )
    scale = acc.num_processes / max(global_tokens, 1)  # DDP averages over ranks
    sums = torch.zeros(3, dtype=torch.float64, device=acc.device)  # loss, distill, ce
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1
        ctx = acc.no_sync(s.student) if not sync else contextlib.nullcontext()
        with ctx:
            out = batch_loss(s, batch, s.loss_fn, cached[i])
            if not torch.isfinite(out.loss):
                raise FloatingPointError(
                    f"non-finite loss ({out.loss.item()}) at step {step}, micro-batch {i}; "
                    f"the student's outputs contain NaN or inf (lower train.lr, check "
                    f"train.mixed_precision, or resume from the last checkpoint)"
                )
            acc.backward(out.loss * scale)
        zero = out.loss.new_zeros(())
        sums += torch.stack(
            [
                out.loss.detach(),
                out.distill if out.distill is not None else zero,
                out.ce if out.ce is not None else zero,
            ]
        ).double()
    grad_norm = None
    if cfg.max_grad_norm is not None:
        grad_norm = acc.clip_grad_norm_(s.student.parameters(), cfg.max_grad_norm)
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    if s.loss_optimizer is not None:
        step_loss_parameters(s)
    means = acc.reduce(sums, reduction="sum") / max(global_tokens, 1)
    return [float(x) for x in means], global_tokens, grad_norm


def _step_terms(
    s: Setup,
    sums: list[float],
    grad_norm: Tensor | None,
    schedule: dict[str, float],
    kinds: list[str],
) -> dict[str, float]:
    """The step's record beyond loss, rate and time: the loss's terms, the gradient norm, the
    schedule's state (t, ...), and what the student-data recipe drew."""
    record: dict[str, float] = {}
    if s.loss_fn.divergence:
        record["distill"] = sums[1]
    if s.loss_fn.distill_weight < 1.0 and s.loss_fn.divergence:
        record["ce"] = sums[2]
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    record.update(schedule)
    if s.student_data is not None:  # the fraction this step drew with, and what it drew
        record["student_fraction"] = s.student_data.fraction
        record["student_batches"] = sum(kind != "dataset" for kind in kinds)
    return record


def _at_intervals(s: Setup, state: TrainState, metrics_path: Path) -> None:
    """The held-out evaluation (which adapts a student-data recipe) and the checkpoint, at
    their intervals; the last step's are :func:`_finish`'s."""
    cfg = s.config.train
    if state.step >= cfg.max_steps:
        return
    if cfg.eval_every and state.step % cfg.eval_every == 0:
        held_out = evaluate(s)
        _log(s.accelerator, metrics_path, {"step": state.step, **held_out})
        if s.student_data is not None and "eval/distill" in held_out:
            s.student_data.after_eval(held_out["eval/distill"])
    if cfg.save_every and state.step % cfg.save_every == 0:
        save_checkpoint(s, state)


def _finish(
    s: Setup,
    state: TrainState,
    metrics_path: Path,
    before: dict[str, float],
    samples: list[dict[str, str]],
    prompts: list[list[int]],
) -> dict[str, Any]:
    """The final evaluation, samples, checkpoint, model and plot; the run's summary."""
    config, acc = s.config, s.accelerator
    after = evaluate(s)
    _log(acc, metrics_path, {"step": state.step, **after})
    for row, prompt in zip(samples, prompts):
        row["student_after"] = greedy(
            acc.unwrap_model(s.student), s.tokenizer, prompt, config.log.sample_tokens
        )
    if not _deepspeed(s):  # see build(): no checkpoints under DeepSpeed
        save_checkpoint(s, state)
    final_dir = save_final(s, state.step)
    if acc.is_main_process and config.log.plot:
        plot_history(read_metrics(metrics_path), metrics_path.parent / "loss_and_t.png")
    acc.end_training()
    return {
        "before": before,
        "after": after,
        "steps": state.step,
        "final_dir": str(final_dir),
        "samples": samples,
        "is_main_process": acc.is_main_process,
        "setup": s,
    }


def _deepspeed(s: Setup) -> bool:
    from accelerate.utils import DistributedType

    return bool(s.accelerator.distributed_type == DistributedType.DEEPSPEED)


def finished_run(config: Config, resume_from: Path | None) -> dict[str, Any] | None:
    """The result of a run that already finished in ``output_dir`` (its last checkpoint is
    at ``train.max_steps`` and ``final/`` is complete), read from its files, with a note; None
    when there is training left to do. Nothing is loaded or rewritten."""
    out_dir = Path(config.output_dir)
    final_dir = out_dir / "final"
    if resume_from is None or CK.step_of(resume_from) != config.train.max_steps:
        return None
    try:
        CK.verify(final_dir)
    except CK.CheckpointError:  # absent, incomplete or corrupt: the run writes it again
        return None
    rows = read_metrics(out_dir / "metrics.jsonl")
    evals = [r for r in rows if "eval/student_ce" in r]
    before: dict[str, Any] = next((r for r in evals if r["step"] == 0), {})
    after: dict[str, Any] = next(
        (r for r in reversed(evals) if r["step"] == config.train.max_steps), {}
    )
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        print(
            f"{out_dir} holds a finished run ({config.train.max_steps} steps; the student is "
            f"in {final_dir}): nothing to do. Use overwrite=true to train it again, or "
            f"another output_dir."
        )
    return {
        "before": before,
        "after": after,
        "steps": config.train.max_steps,
        "final_dir": str(final_dir),
        "samples": [],
        "is_main_process": main,
        "setup": None,
        "finished": True,
    }


def save_final(s: Setup, step: int) -> Path:
    """The trained student and tokenizer in ``output_dir/final`` (``from_pretrained`` loads
    it), written under a temporary name with a checksummed manifest and then renamed, so that
    ``final`` is either the complete new student or the previous one."""
    acc = s.accelerator
    out_dir = Path(s.config.output_dir)
    final_dir, tmp = out_dir / "final", out_dir / ".tmp-final"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    if _deepspeed(s):  # ZeRO-3 partitions parameters its own way; accelerate gathers them
        state = acc.get_state_dict(s.student)
    else:
        state, _ = CK.full_state_dicts(s.student)  # a collective under FSDP
    if acc.is_main_process:
        acc.unwrap_model(s.student).save_pretrained(tmp, state_dict=state)
        s.tokenizer.save_pretrained(tmp)
        CK.write_manifest(tmp, step)
        CK.publish(tmp, final_dir)
    acc.wait_for_everyone()
    return final_dir


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a line cut short by a kill is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


def restart_metrics(out_dir: Path, step: int) -> None:
    """Make ``metrics*.jsonl`` hold the rows of this run up to ``step`` only: a resumed run
    rewrites the steps after its checkpoint, and a run from step 0 starts new files."""
    for path in sorted(out_dir.glob("metrics*.jsonl")):
        rows = [r for r in read_metrics(path) if step > 0 and r["step"] <= step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)


def sample_prompts(examples: list[D.Example], n: int) -> list[list[int]]:
    """Up to ``n`` prompts: each example's tokens before its first target token."""
    prompts = []
    for ex in examples[:n]:
        first = next((i for i, t in enumerate(ex.targets) if t), len(ex.targets))
        prompts.append(ex.input_ids[: max(first, 1)])
    return prompts


@torch.no_grad()
def greedy(model: Any, tokenizer: Any, prompt: list[int], max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` (token ids), decoded without special tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v if v is not None else "null"
        else:
            out[key] = str(v)
    return out


def _log(acc: Any, path: Path, record: dict[str, Any]) -> None:
    """One JSON line in output_dir/metrics.jsonl (main process) and the trackers. Other ranks
    write step, loss and t to metrics.rankN.jsonl, so agreement across ranks can be checked."""
    if acc.is_main_process:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    elif "loss" in record:
        rank_path = path.with_name(f"metrics.rank{acc.process_index}.jsonl")
        with rank_path.open("a") as f:
            f.write(json.dumps({k: record[k] for k in ("step", "loss", "t") if k in record}) + "\n")
    acc.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def plot_history(rows: list[dict[str, Any]], path: Path) -> bool:
    """The run's ``metrics.jsonl`` rows as a PNG: the training loss and the held-out
    KL(teacher || student) against the optimizer step, and TAID's t on a second axis, with a
    legend. With TAID the training loss is a KL to a target that moves towards the teacher, so
    it may rise while the held-out KL falls: the plot shows both. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [r for r in rows if "loss" in r]
    held_out = [r for r in rows if "eval/kl_teacher_student" in r]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    lines = ax.plot(
        [r["step"] for r in train],
        [r["loss"] for r in train],
        color="tab:blue",
        label="training loss (to the current target)",
    )
    if held_out:
        lines += ax.plot(
            [r["step"] for r in held_out],
            [r["eval/kl_teacher_student"] for r in held_out],
            "o-",
            color="tab:green",
            label="held-out KL(teacher || student)",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    with_t = any("t" in r for r in train)
    if with_t:
        ax2 = ax.twinx()
        lines += ax2.plot(
            [r["step"] for r in train if "t" in r],
            [r["t"] for r in train if "t" in r],
            color="tab:red",
            linestyle="--",
            label="TAID's t (right axis)",
        )
        ax2.set_ylabel("t")
        ax2.set_ylim(0, 1.02)
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="upper right", fontsize=8)
    ax.set_title("training loss, held-out KL to the teacher" + (", and t" if with_t else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
