"""Datasets to token batches.

Formats: plain text, prompt/response pairs and chat ``messages`` (rendered with the tokenizer's
chat template). The tokens that are distilled are the assistant's (``loss_on: response``,
default for chat and pairs, end-of-turn token included so the student learns to stop) or all of
them (``loss_on: all``). Labels are shifted here, once: position ``i`` predicts ``labels[i]``.

Packing concatenates examples into ``max_length`` rows with ``position_ids`` restarting at each
example and no attention mask, so transformers builds a block-diagonal causal mask: attention
never crosses examples.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from taid.config import ConfigError, DataConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
logger = logging.getLogger("taid")
_LOCAL_LOADERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".csv": "csv",
}


@dataclass
class Example:
    """One tokenized example: ``input_ids`` and the loss mask over them (1 = a target token).
    A packed row also lists the ``lengths`` of the examples it holds, in order. ``ids`` are the
    examples' numbers in the run's dataset (see :func:`load_examples`), by which a teacher cache
    finds their rows."""

    input_ids: list[int]
    targets: list[int]
    lengths: list[int] | None = None
    ids: list[int] | None = None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _is_local(path: str) -> bool:
    return (
        Path(path).suffix.lower() in _LOCAL_LOADERS
        or Path(path).exists()
        or path.startswith((".", "/", "~"))
    )


Rows = Iterable[tuple[str, dict[str, Any]]]
"""Raw rows, each with where it came from (``file:line`` or ``dataset example N``, 1-based), so
that an error names the row to fix."""


def check_local_path(cfg: DataConfig) -> Path | None:
    """The data file when ``data.path`` is local (None for a hub dataset): checked before any
    model, tokenizer or process group starts.

    Raises:
        ConfigError: the file does not exist (relative paths are resolved from the current
            directory, which the message names).
    """
    if not cfg.path:
        raise ConfigError(
            "data.path is required: a local .jsonl/.json/.parquet/.txt/.csv file "
            "or a hub dataset name"
        )
    if not _is_local(cfg.path):
        return None
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        where = (
            ""
            if path.is_absolute()
            else f" (relative paths start at the current directory, {Path.cwd()})"
        )
        raise ConfigError(f"data.path: file {str(path)!r} does not exist{where}")
    return path


def load_rows(cfg: DataConfig, split: str) -> Rows:
    """The raw rows of a local file or a hub dataset.

    JSON Lines and JSON files are read here, so that a bad byte or a malformed line is named by
    its 1-based line; other files and hub datasets go through ``datasets``.
    """
    if not _is_local(cfg.path):
        import datasets

        rows = datasets.load_dataset(cfg.path, cfg.name, split=split, streaming=cfg.streaming)
        return ((f"{cfg.path} example {i}", row) for i, row in enumerate(rows, 1))
    path = check_local_path(cfg)
    assert path is not None
    builder = _LOCAL_LOADERS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(
            f"data.path: unsupported file type {path.suffix!r}; use one of "
            f"{', '.join(_LOCAL_LOADERS)}"
        )
    if split != "train":
        raise ConfigError(
            f"data.eval_split={split!r}: a local file has one split; use "
            f"data.eval_size to hold out examples"
        )
    data = path.read_bytes()
    if not data.strip():
        raise ConfigError(f"data.path {str(path)!r}: the file is empty")
    if path.suffix.lower() == ".jsonl":
        return list(_json_lines(path, data))
    text = _utf8(path, data)
    if path.suffix.lower() == ".json":
        return _json_file(path, text)
    import datasets

    try:
        rows = datasets.load_dataset(
            builder, data_files=str(path), split="train", streaming=cfg.streaming
        )
    except Exception as e:  # noqa: BLE001 - any reader failure is the file's problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            f"data.path {str(path)!r}: could not be read as {builder} ({type(e).__name__}: {first})"
        ) from None
    return ((f"{path} row {i}", row) for i, row in enumerate(rows, 1))


def _utf8(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at "
            f"column {column}); save the file as UTF-8"
        ) from None


def _json_lines(path: Path, data: bytes) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                f"{e.start + 1}); save the file as UTF-8"
            ) from None
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{where}: not valid JSON ({e.msg} at column {e.colno}); each "
                f"line must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise ConfigError(
                f"{where}: a JSON {type(row).__name__}, not an object; each line "
                f'must be one JSON object such as {{"messages": [...]}}'
            )
        yield where, row


def _json_file(path: Path, text: str) -> Rows:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
        ) from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(
            f"{path}: a .json file must hold a list of objects (one per example);"
            f" for one object per line name the file .jsonl"
        )
    return [(f"{path} example {i}", row) for i, row in enumerate(rows, 1)]


def detect_format(columns: list[str], cfg: DataConfig) -> str:
    """The data format from the configured one or the columns present."""
    if cfg.format != "auto":
        needed = {
            "text": [cfg.text_field],
            "messages": [cfg.messages_field],
            "prompt_response": [cfg.prompt_field, cfg.response_field],
        }[cfg.format]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ConfigError(
                f"data.format={cfg.format!r} needs fields {missing}; the dataset has {columns}"
            )
        return cfg.format
    if cfg.messages_field in columns:
        return "messages"
    if cfg.prompt_field in columns and cfg.response_field in columns:
        return "prompt_response"
    if cfg.text_field in columns:
        return "text"
    raise ConfigError(
        f"data.format: cannot tell the format from the fields {columns}; set "
        f"data.format and the field names (data.text_field, ...)"
    )


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------
def _chat_ids(
    tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool
) -> list[int]:
    out = tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]  # type: ignore[call-overload,index]
    return [int(i) for i in out]  # type: ignore[arg-type]


def check_messages(messages: Any) -> None:
    """Raise ValueError naming what is wrong with a list of chat turns."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else f"a {type(messages).__name__}"
        raise ValueError(
            f'the chat turns must be a non-empty list of {{"role", "content"}} objects, got {got}'
        )
    for j, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise ValueError(
                f'turn {j} is a {type(message).__name__}, not an object with "role" and "content"'
            )
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"turn {j} has no {key!r} (it has {sorted(message)})")
        if not isinstance(message["role"], str):
            raise ValueError(f"turn {j}: 'role' must be a string, got {message['role']!r}")


def tokenize_messages(
    tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], response_only: bool
) -> Example:
    """Render chat turns with the tokenizer's template; targets are the assistant turns (with
    their end-of-turn tokens), or everything."""
    check_messages(messages)
    ids = _chat_ids(tok, messages, add_generation_prompt=False)
    if not response_only:
        return Example(ids, [1] * len(ids))
    targets = [0] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(_chat_ids(tok, messages[:i], add_generation_prompt=True)) if i else 0
        prefix = _chat_ids(tok, messages[: i + 1], add_generation_prompt=False)
        end = len(prefix)
        if ids[:end] != prefix:
            raise ValueError("the chat template is not prefix-consistent; use loss_on: all")
        for j in range(start, end):
            targets[j] = 1
    return Example(ids, targets)


def tokenize_row(
    row: dict[str, Any], fmt: str, tok: PreTrainedTokenizerBase, cfg: DataConfig
) -> Example:
    """One raw row to an :class:`Example`."""
    response_only = cfg.loss_on == "response" or (cfg.loss_on == "auto" and fmt != "text")
    if fmt == "messages":
        return tokenize_messages(tok, row[cfg.messages_field], response_only)
    if fmt == "prompt_response":
        prompt, response = str(row[cfg.prompt_field]), str(row[cfg.response_field])
        if tok.chat_template:
            return tokenize_messages(
                tok,
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                response_only,
            )
        p = tok(prompt, add_special_tokens=True)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return Example(p + r, [0 if response_only else 1] * len(p) + [1] * len(r))
    if response_only:
        raise ConfigError("data.loss_on=response needs prompt/response or chat data, not text")
    ids = tok(str(row[cfg.text_field]), add_special_tokens=True)["input_ids"]
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        ids = ids + [tok.eos_token_id]
    return Example(ids, [1] * len(ids))


def shift_labels(ids: list[int], targets: list[int]) -> list[int]:
    """``labels[i] = ids[i + 1]`` where token ``i + 1`` is a target, else ignored; the last
    position predicts nothing. The one place labels are shifted."""
    labels = [tok if tgt else IGNORE_INDEX for tok, tgt in zip(ids[1:], targets[1:])]
    return labels + [IGNORE_INDEX]


def fit_length(example: Example, cfg: DataConfig, where: str) -> Example:
    """``example`` cut to ``data.max_length`` tokens (or an error naming ``where``, when
    truncation is off)."""
    if len(example.input_ids) <= cfg.max_length:
        return example
    if not cfg.truncation:
        raise ConfigError(
            f"{where} has {len(example.input_ids)} tokens, more than data.max_length="
            f"{cfg.max_length}, and data.truncation is false; raise max_length or allow "
            f"truncation"
        )
    n = cfg.max_length
    return Example(example.input_ids[:n], example.targets[:n])


def tokenize_dataset(
    rows: Rows, tok: PreTrainedTokenizerBase, cfg: DataConfig, limit: int | None = None
) -> list[Example]:
    """Tokenize every row (or the first ``limit``) and check lengths. Examples without any
    target token (no response, or a prompt that fills ``max_length``) are dropped, counted and
    reported; more than ``data.max_dropped_fraction`` of them stops the run.

    Raises:
        ConfigError: a row that cannot be tokenized, named by its file and line (or number).
    """
    examples: list[Example] = []
    fmt = None
    total = 0
    dropped = {"no_target": 0, "truncated": 0}
    for i, (where, row) in enumerate(rows):
        if limit is not None and i >= limit:
            break
        total += 1
        if fmt is None:
            fmt = detect_format(list(row), cfg)
        try:
            full = tokenize_row(row, fmt, tok, cfg)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - a row the tokenizer or template rejects
            raise ConfigError(
                f"{where}: cannot be tokenized as {fmt} data ({_reason(e, cfg)})"
            ) from None
        if sum(full.targets[1:]) == 0:
            dropped["no_target"] += 1
            continue
        ex = fit_length(full, cfg, where)
        if sum(ex.targets[1:]) == 0:
            dropped["truncated"] += 1
            continue
        examples.append(ex)
    _report_dropped(cfg, total, dropped)
    if not examples:
        raise ConfigError(
            f"data.path {cfg.path!r}: no usable examples (empty dataset, or no "
            f"target tokens after masking and truncation)"
        )
    return examples


def _reason(e: Exception, cfg: DataConfig) -> str:
    if isinstance(e, KeyError):
        return f"it has no field {e.args[0]!r}; set data.format and the data.*_field names"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if not isinstance(e, ValueError) else text


def _report_dropped(cfg: DataConfig, total: int, dropped: dict[str, int]) -> None:
    n = sum(dropped.values())
    if not n:
        return
    parts = []
    if dropped["no_target"]:
        parts.append(
            f"{dropped['no_target']} with no target token (no assistant turn or "
            f"response, or an empty one)"
        )
    if dropped["truncated"]:
        parts.append(f"{dropped['truncated']} whose prompt fills data.max_length={cfg.max_length}")
    message = f"data.path {cfg.path!r}: dropped {n} of {total} examples: {'; '.join(parts)}"
    if n > cfg.max_dropped_fraction * total:
        raise ConfigError(
            f"{message}; more than data.max_dropped_fraction="
            f"{cfg.max_dropped_fraction} of the data. Fix the data, raise "
            f"data.max_length, or raise data.max_dropped_fraction"
        )
    logger.warning(message)


def load_examples(
    cfg: DataConfig, tok: PreTrainedTokenizerBase
) -> tuple[list[Example], list[Example]]:
    """The run's tokenized examples of ``data.split`` and of ``data.eval_split`` (else empty),
    numbered in that order (``Example.ids``): the numbering a teacher cache is indexed by."""
    train = tokenize_dataset(load_rows(cfg, cfg.split), tok, cfg, cfg.max_examples)
    held = tokenize_dataset(load_rows(cfg, cfg.eval_split), tok, cfg) if cfg.eval_split else []
    for i, ex in enumerate(train + held):
        ex.ids = [i]
    return train, held


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------
def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate examples, in order, into rows of at most ``max_length`` tokens (an example is
    never split); each row records the ``lengths`` of its examples."""
    groups: list[list[Example]] = [[]]
    used = 0
    for ex in examples:
        if used + len(ex.input_ids) > max_length and groups[-1]:
            groups.append([])
            used = 0
        groups[-1].append(ex)
        used += len(ex.input_ids)
    return [
        Example(
            [t for ex in group for t in ex.input_ids],
            [t for ex in group for t in ex.targets],
            [len(ex.input_ids) for ex in group],
            _joined_ids(group),
        )
        for group in groups
        if group
    ]


def _joined_ids(examples: list[Example]) -> list[int] | None:
    """The example numbers of several examples in order; None if any has none."""
    out: list[int] = []
    for ex in examples:
        if ex.ids is None:
            return None
        out.extend(ex.ids)
    return out


def collate(
    batch: list[Example], pad_id: int, packed: bool, length: int | None = None
) -> dict[str, Tensor]:
    """Pad to the longest row (or ``length``); labels shifted per example, -100 at padding.

    Unpacked rows get an ``attention_mask``; packed rows get ``position_ids`` that restart at
    every example (the padding tail counts as one more example) and no attention mask, from
    which transformers builds a block-diagonal causal mask, provided the model runs with
    ``use_cache=False`` (as the trainer does). When every example is numbered, ``example_ids``
    lists their numbers in row-major order: the order of their target tokens in the flattened
    labels.
    """
    width = length or max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    for b, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[b, :n] = torch.tensor(ex.input_ids)
        mask[b, :n] = 1
        lengths = ex.lengths or [n]
        start = 0
        for part in lengths:
            sl = slice(start, start + part)
            labels[b, sl] = torch.tensor(shift_labels(ex.input_ids[sl], ex.targets[sl]))
            positions[b, sl] = torch.arange(part)
            start += part
        positions[b, n:] = torch.arange(width - n)
    out = (
        {"input_ids": ids, "position_ids": positions, "labels": labels}
        if packed
        else {"input_ids": ids, "attention_mask": mask, "labels": labels}
    )
    numbers = _joined_ids(batch)
    if numbers is not None:
        out["example_ids"] = torch.tensor(numbers, dtype=torch.long)
    return out


class BatchStream:
    """Deterministic, resumable batches: epoch ``e`` shuffles with ``seed + e``; global batch
    ``k`` holds ``world_size * batch_size`` examples and rank ``r`` takes its slice, so the
    position ``(epoch, batch)`` alone restores the order."""

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        *,
        seed: int,
        pad_id: int,
        packed: bool,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.packed = packed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        global_batch = batch_size * world_size
        if len(examples) < global_batch:
            raise ConfigError(
                f"only {len(examples)} training examples for a global batch of "
                f"{global_batch} (train.batch_size x processes); add data or "
                f"lower the batch size"
            )
        self.batches_per_epoch = len(examples) // global_batch  # drop the ragged tail
        self.epoch = 0
        self.batch = 0

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        while True:
            order = self.order(self.epoch)
            while self.batch < self.batches_per_epoch:
                start = (self.batch * self.world_size + self.rank) * self.batch_size
                chosen = [self.examples[i] for i in order[start : start + self.batch_size]]
                self.batch += 1
                yield collate(chosen, self.pad_id, self.packed)
            self.epoch += 1
            self.batch = 0


def eval_batches(
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    packed: bool,
    *,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
) -> Iterator[dict[str, Tensor]]:
    """The held-out examples in order, split across ranks (every rank gets the same number of
    batches; a rank short of examples gets an all-ignored batch so collectives stay aligned)."""
    per_step = batch_size * world_size
    steps = math.ceil(len(examples) / per_step)
    if limit is not None:
        steps = min(steps, limit)
    for k in range(steps):
        start = k * per_step + rank * batch_size
        chosen = examples[start : start + batch_size]
        if not chosen:
            chosen = [
                Example(
                    examples[0].input_ids,
                    [0] * len(examples[0].input_ids),
                    ids=None if examples[0].ids is None else [],
                )
            ]
        yield collate(chosen, pad_id, packed)


def held_out(
    train: list[Example], held: list[Example], cfg: DataConfig, seed: int
) -> tuple[list[Example], list[Example]]:
    """The run's training and held-out examples: ``held`` when ``data.eval_split`` gave some,
    else ``data.eval_size`` examples of ``train`` chosen with ``data.eval_seed`` (or the run's
    ``seed`` when it is unset)."""
    if held:
        return train, held
    eval_seed = seed if cfg.eval_seed is None else cfg.eval_seed
    return split_eval(train, cfg.eval_size, eval_seed)


def split_eval(
    examples: list[Example], size: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out ``size`` examples (a seeded choice) for evaluation."""
    if size <= 0:
        return examples, []
    if size >= len(examples):
        raise ConfigError(
            f"data.eval_size={size} leaves no training examples out of {len(examples)}"
        )
    g = torch.Generator().manual_seed(seed + 10_007)
    perm = torch.randperm(len(examples), generator=g).tolist()
    held = set(perm[:size])
    return (
        [ex for i, ex in enumerate(examples) if i not in held],
        [examples[i] for i in sorted(held)],
    )
