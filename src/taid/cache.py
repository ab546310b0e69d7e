"""Where the teacher's signal comes from: the model beside the student, or a cache of its
outputs written once (:func:`write_cache`) and streamed from disk (:class:`TeacherCache`).

A cache holds one row per *target* token (a position whose label is not ignored), in the order
of the flattened labels, so a batch's rows are the concatenation of its examples' rows. Three
forms, each read back as a full teacher distribution over ``V`` ids:

- ``topk``: the ``k`` largest log-probabilities and their ids (ids packed into the fewest bytes
  that hold ``V - 1``: 2 bytes for ``V <= 65536``). Read as
  :class:`taid.sources.TopKTeacher`: the top ``k`` exact, the remaining mass
  ``r = 1 - sum(exp(top))`` spread evenly over the other ``V - k`` ids.
- ``hidden``: the teacher's last hidden states, with its output layer stored once
  (``head.safetensors``); logits are rebuilt chunk by chunk (:class:`taid.sources.LinearTeacher`),
  exactly the online teacher's when stored in float32.
- ``full``: the logits themselves (:class:`taid.sources.LogitsTeacher`).

Directory layout::

    manifest.json             identity (teacher, tokenizer, data, settings) + shard index
    head.safetensors          hidden mode: the teacher's output layer (weight [V_T, H], bias)
    shard-00000.safetensors   examples [first, first + n): "offsets" [n + 1] (int64) and the
                              rows of the mode ("log_probs" + "ids" | "hidden" | "logits")

Shards are written to a temporary name and renamed, each process writes every
``world_size``-th shard, and a shard already on disk with this cache's identity is kept, so an
interrupted write resumes where it stopped.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import shutil
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from taid import checkpoint as CK
from taid import chunked as C
from taid import data as D
from taid import models as M
from taid import sources as S
from taid.config import Config, ConfigError
from taid.config import first_difference as config_difference

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HEAD = "head.safetensors"
DEFAULT_DTYPES = {"topk": "float16", "hidden": "bfloat16", "full": "float32"}
STORED = {"topk": ("log_probs", "ids"), "hidden": ("hidden",), "full": ("logits",)}
# Identity fields that describe the cache but need not match a run that reads it.
_INFORMATIONAL = ("data_path", "teacher_weights_sha256", "num_target_tokens", "hidden_size")


class CacheError(ConfigError):
    """A teacher cache that is missing, corrupt, or does not match the run."""


# --------------------------------------------------------------------------------------------
# Packed token ids
# --------------------------------------------------------------------------------------------
def id_bytes(vocab_size: int) -> int:
    """Bytes per stored token id: the fewest that hold ``vocab_size - 1``."""
    return max(1, math.ceil(max(vocab_size - 1, 1).bit_length() / 8))


def pack_ids(ids: Tensor, nbytes: int) -> Tensor:
    """Integer ids ``[...]`` as little-endian bytes ``[..., nbytes]`` (uint8)."""
    ids = ids.long()
    return torch.stack([(ids >> (8 * i)) & 0xFF for i in range(nbytes)], -1).to(torch.uint8)


def unpack_ids(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_ids`: int64 ids ``[...]``."""
    out = packed[..., 0].long()
    for i in range(1, packed.shape[-1]):
        out |= packed[..., i].long() << (8 * i)
    return out


# --------------------------------------------------------------------------------------------
# Identity: what a cache was written from
# --------------------------------------------------------------------------------------------
def _sha256(parts: Sequence[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of what decides token ids: the vocabulary, merges, added tokens, normalisation,
    pre-tokenisation, special tokens and the chat template (not padding/truncation state)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        parts: dict[str, Any] = {
            k: spec.get(k)
            for k in ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor")
        }
    else:
        parts = {"vocab": sorted(tokenizer.get_vocab().items())}
    parts["chat_template"] = getattr(tokenizer, "chat_template", None)
    parts["special"] = {
        k: getattr(tokenizer, k, None)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    }
    parts["length"] = len(tokenizer)
    return _sha256([json.dumps(parts, sort_keys=True, default=str).encode()])


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 over the model's parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_hash(examples: Sequence[D.Example]) -> str:
    """SHA-256 of the tokenized examples (ids and target masks, in order)."""
    parts: list[bytes] = []
    for ex in examples:
        parts += [
            array("i", [len(ex.input_ids)]).tobytes(),
            array("i", ex.input_ids).tobytes(),
            bytes(ex.targets),
        ]
    return _sha256(parts)


def target_rows(example: D.Example) -> int:
    """How many cache rows an example has: its positions with a (shifted) label."""
    return sum(
        1 for lab in D.shift_labels(example.input_ids, example.targets) if lab != D.IGNORE_INDEX
    )


def teacher_id(config: Config) -> str:
    """The teacher's name, or ``architecture:<hash>`` for a randomly initialised one."""
    t = config.teacher
    if t.name_or_path:
        return t.name_or_path
    spec = json.dumps(t.architecture, sort_keys=True).encode()
    return f"architecture:{_sha256([spec])[:16]}:seed={config.seed}"


def resolved_dtype(config: Config) -> str:
    c = config.cache
    return DEFAULT_DTYPES[c.mode] if c.dtype == "auto" else c.dtype


def identity(
    config: Config,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[D.Example],
    vocab_size: int,
) -> dict[str, Any]:
    """The manifest fields that must agree between a cache and a run reading it (plus the
    informational ``data_path``)."""
    d = config.data
    return {
        "format_version": FORMAT_VERSION,
        "mode": config.cache.mode,
        "k": config.cache.k if config.cache.mode == "topk" else None,
        "dtype": resolved_dtype(config),
        "vocab_size": vocab_size,
        "teacher": teacher_id(config)
        if (config.teacher.name_or_path or config.teacher.architecture)
        else None,
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "tokenization": {
            k: getattr(d, k)
            for k in (
                "name",
                "split",
                "eval_split",
                "format",
                "text_field",
                "prompt_field",
                "response_field",
                "messages_field",
                "loss_on",
                "max_length",
                "truncation",
                "max_examples",
            )
        },
        "dataset_sha256": dataset_hash(examples),
        "num_examples": len(examples),
        "data_path": d.path,
    }


def _identity_key(ident: dict[str, Any]) -> str:
    """What a shard is stamped with: every identity field but the data's file name."""
    checked = {k: v for k, v in ident.items() if k != "data_path"}
    return _sha256([json.dumps(checked, sort_keys=True).encode()])[:32]


_HINTS = {
    "tokenization": "tokenize as when the cache was written",
    "dataset_sha256": "the tokenized data differ: use the data the cache was written from",
    "tokenizer_sha256": "use the tokenizer the cache was written with",
    "teacher": "name the teacher the cache was written from",
}


def first_difference(cached: dict[str, Any], run: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first field of ``run`` that differs from ``cached`` as ``(dotted name, cached
    value, run value)``; fields set to ``None`` in ``run`` and informational fields are not
    compared."""
    compared = {k: v for k, v in run.items() if k not in _INFORMATIONAL and v is not None}
    return config_difference({k: cached.get(k) for k in compared}, compared)


def compare(cached: dict[str, Any], run: dict[str, Any], where: str) -> None:
    """Raise :class:`CacheError` naming the first field of ``run`` that differs from
    ``cached``, with both values (see :func:`first_difference`)."""
    diff = first_difference(cached, run)
    if diff is not None:
        name, have, want = diff
        hint = _HINTS.get(name.split(".")[0], "match it")
        raise CacheError(
            f"teacher cache {where}: {name} differs (cache: {have!r}, this run: "
            f"{want!r}); {hint}, or rewrite the cache with this config "
            f"(taid-cache-teacher)"
        )


# --------------------------------------------------------------------------------------------
# Computing the stored rows
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_rows(
    teacher: torch.nn.Module,
    batch: dict[str, Tensor],
    mode: str,
    *,
    vocab_size: int,
    k: int,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """The stored rows of one collated batch, one per target token in flattened order."""
    inputs = {key: v for key, v in batch.items() if key not in ("labels", "example_ids")}
    valid = (batch["labels"] != D.IGNORE_INDEX).reshape(-1)
    try:
        M.plain_linear_head(teacher)
        fused = True
    except ValueError as e:
        if mode == "hidden":
            raise CacheError(
                f"cache.mode=hidden needs a plain linear output layer: {e}; use "
                f"cache.mode=topk or full"
            ) from None
        fused = False
    try:
        everything = S.from_model(teacher, inputs, fused=fused)
    except FloatingPointError as e:
        ids = batch.get("example_ids")
        which = f" (examples {ids.tolist()})" if ids is not None else ""
        raise FloatingPointError(f"{e}{which}") from None
    # The stored rows: target tokens only
    source: S.TeacherSource
    if isinstance(everything, S.LinearTeacher):
        if mode == "hidden":
            return {"hidden": everything.hidden[valid].to(dtype)}
        source = S.LinearTeacher(everything.hidden[valid], everything.weight, everything.bias)
    else:
        source = S.LogitsTeacher(everything.logits[valid])  # type: ignore[attr-defined]
    n = source.num_rows  # >= 1: examples without a target token are dropped when tokenized
    chunk = C.default_chunk_size(n, vocab_size, valid.device)
    parts: dict[str, list[Tensor]] = {name: [] for name in STORED[mode]}
    nbytes = id_bytes(vocab_size)
    raw = S.exact_logits(source, vocab_size)
    for start in range(0, n, chunk):
        z = raw(slice(start, min(start + chunk, n)))
        _check_finite(z, batch)
        if mode == "full":
            parts["logits"].append(z.to(dtype))
        else:
            values, ids = canonical_topk(torch.log_softmax(z, -1), min(k, vocab_size))
            parts["log_probs"].append(values.to(dtype))
            parts["ids"].append(pack_ids(ids, nbytes))
    return {name: torch.cat(p) for name, p in parts.items()}


def canonical_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``x`` (shape ``(n, V)``), ordered by value
    (largest first) and, among equal values, by id (smallest first); of the entries tied at the
    k-th value, the smallest ids are kept.

    ``torch.topk`` leaves both choices to the kernel, and they change with the number of
    threads, so the same teacher would write different bytes on different machines or with a
    different number of processes. This order depends on the values alone.

    Returns:
        ``(values, ids)``, each of shape ``(n, k)``; ``ids`` is int64.
    """
    values, ids = x.topk(k, dim=-1)
    # Rows whose k-th value is tied with an entry left out: the kernel chose among the ties;
    # a stable sort of the whole row chooses the smallest ids instead (rare, so cheap).
    boundary = (x >= values[:, -1:]).sum(-1) > k
    if boundary.any():
        rows = boundary.nonzero().squeeze(1)
        full_values, full_ids = x[rows].sort(dim=-1, descending=True, stable=True)
        values[rows], ids[rows] = full_values[:, :k], full_ids[:, :k]
    # Within the chosen set: by id, then (stably) by value, so equal values are in id order.
    ids, by_id = ids.sort(dim=-1)
    values = values.gather(-1, by_id)
    values, by_value = values.sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(-1, by_value)


def _check_finite(x: Tensor, batch: dict[str, Tensor]) -> None:
    if not torch.isfinite(x).all():
        ids = batch.get("example_ids")
        which = f" (examples {ids.tolist()})" if ids is not None else ""
        raise FloatingPointError(
            f"the teacher's outputs contain NaN or inf{which}; check "
            f"teacher.dtype (float16 overflows in some models)"
        )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, Any]) -> None:
    """Write a safetensors file under a temporary name and rename it; ``metadata`` gets the
    SHA-256 of the tensors' contents (``tensors_sha256``), so that a file kept by a later run
    of the writer can be checked before it is trusted."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    metadata = {**metadata, "tensors_sha256": _tensors_sha256(tensors)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # One metadata key: safetensors writes several in no fixed order, and equal shards should
    # be equal files.
    save_file(tensors, str(tmp), metadata={"taid": json.dumps(metadata, sort_keys=True)})
    os.replace(tmp, path)


def _tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes of ``tensors``, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _intact(path: Path, expected: dict[str, Any]) -> bool:
    """Whether ``path`` is a file written with ``expected`` metadata whose tensors still have
    the contents it was written with (a flipped byte, a truncation: False, so it is rewritten)."""
    from safetensors.torch import load_file

    meta = _shard_metadata(path)
    if meta is None or {k: v for k, v in meta.items() if k != "tensors_sha256"} != expected:
        return False
    try:
        return _tensors_sha256(load_file(str(path))) == meta.get("tensors_sha256")
    except Exception:  # noqa: BLE001 - unreadable means "write it again"
        return False


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _shard_name(j: int) -> str:
    return f"shard-{j:05d}.safetensors"


def _shard_metadata(path: Path) -> dict[str, Any] | None:
    """A shard's header metadata, or None if the file is absent or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["taid"])
    except Exception:  # noqa: BLE001 - unreadable means "write it again"
        return None


@dataclass
class _Writer:
    """What every step of :func:`write_cache` shares."""

    config: Config
    acc: Any
    root: Path
    tokenizer: Any
    examples: list[D.Example]
    teacher: Any
    vocab: int
    ident: dict[str, Any]
    key: str

    @property
    def mode(self) -> str:
        return self.config.cache.mode

    @property
    def per_shard(self) -> int:
        return self.config.cache.examples_per_shard

    @property
    def num_shards(self) -> int:
        return max(1, math.ceil(len(self.examples) / self.per_shard))

    def shard_range(self, j: int) -> tuple[int, int]:
        first = j * self.per_shard
        return first, min(self.per_shard, len(self.examples) - first)

    def shard_examples(self, j: int) -> list[D.Example]:
        first, count = self.shard_range(j)
        return self.examples[first : first + count]

    def stamp(self, j: int) -> dict[str, Any]:
        first, count = self.shard_range(j)
        return {"identity": self.key, "first_example": first, "num_examples": count}


def write_cache(config: Config, *, progress: bool | None = None) -> Path:
    """Run the teacher of ``config`` over the run's examples and write the cache to
    ``teacher.cache_dir`` (see the module docstring). Call it in every process of an
    ``accelerate launch``; each writes its own shards. Returns the cache directory.

    Raises:
        CacheError: the directory holds a cache with other settings (unless
            ``cache.overwrite``), or the teacher's output layer does not allow the mode.
    """
    w = _start_writer(config)
    _prepare_directory(w)
    todo = [
        j
        for j in range(w.num_shards)
        if j % w.acc.num_processes == w.acc.process_index
        and not _intact(w.root / _shard_name(j), w.stamp(j))
    ]
    _write_shards(w, todo, config.log.progress if progress is None else progress)
    w.acc.wait_for_everyone()
    if w.acc.is_main_process:
        _write_manifest(w)
    w.acc.wait_for_everyone()
    return w.root


def _start_writer(config: Config) -> _Writer:
    """Checks, the Accelerator, the tokenized examples, the teacher and the cache identity."""
    from accelerate.utils import set_seed

    if not config.teacher.cache_dir:
        raise ConfigError("teacher.cache_dir is required: where to write the cache")
    if not (config.teacher.name_or_path or config.teacher.architecture):
        raise ConfigError(
            "teacher.name_or_path (or teacher.architecture) is required to write a teacher cache"
        )
    acc = M.process_state(config.train.collective_timeout_s)
    set_seed(config.seed)  # a teacher built from an architecture gets the trainer's weights
    tokenizer = M.run_tokenizer(config)
    train, held = D.load_examples(config.data, tokenizer)
    examples = train + held
    with torch.random.fork_rng(devices=[]):  # as the trainer builds it
        teacher = M.freeze(M.load_model(config.teacher)).to(acc.device)
    vocab = len(tokenizer)
    M.shared_vocab_size(teacher, teacher, vocab)  # refuses an output layer narrower than it
    ident = identity(config, tokenizer, examples, vocab)
    ident["teacher_weights_sha256"] = weights_hash(teacher)
    ident["num_target_tokens"] = sum(target_rows(ex) for ex in examples)
    return _Writer(
        config,
        acc,
        Path(config.teacher.cache_dir),
        tokenizer,
        examples,
        teacher,
        vocab,
        ident,
        _identity_key(ident),
    )


def _prepare_directory(w: _Writer) -> None:
    """Refuse a directory holding another cache (unless ``cache.overwrite``), else make it and
    write the output layer of a hidden cache. Every process checks the manifest, so that a
    refusal stops all of them."""
    manifest_path = w.root / MANIFEST
    diff = None
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
            diff = first_difference(old, w.ident)
            if (
                diff is None
                and old.get("teacher_weights_sha256") != w.ident["teacher_weights_sha256"]
            ):
                diff = (
                    "teacher_weights_sha256",
                    old.get("teacher_weights_sha256"),
                    w.ident["teacher_weights_sha256"],
                )
        except json.JSONDecodeError:
            diff = ("manifest.json", "unreadable", "a new cache")
    if diff is not None and not w.config.cache.overwrite:
        name, have, want = diff
        raise CacheError(
            f"{w.root} holds a teacher cache written with other settings "
            f"({name} differs: cache {have!r}, now {want!r}); choose another "
            f"teacher.cache_dir or set cache.overwrite=true"
        )
    w.acc.wait_for_everyone()
    if w.acc.is_main_process:
        if diff is not None:
            shutil.rmtree(w.root)
        w.root.mkdir(parents=True, exist_ok=True)
        if w.mode == "hidden":
            weight, bias = M.plain_linear_head(w.teacher)
            head = {"weight": weight.detach()}
            if bias is not None:
                head["bias"] = bias.detach()
            _atomic_save(head, w.root / HEAD, {"identity": w.key})
    w.acc.wait_for_everyone()


def _write_shards(w: _Writer, todo: list[int], show_progress: bool) -> None:
    """Run the teacher over each shard of ``todo`` and write it (atomically)."""
    bar = None
    if show_progress and w.acc.is_local_main_process and todo:
        from tqdm.auto import tqdm

        total = sum(len(ex.input_ids) for j in todo for ex in w.shard_examples(j))
        bar = tqdm(
            total=total * w.acc.num_processes,
            unit="tok",
            unit_scale=True,
            desc=f"cache {w.mode}",
            dynamic_ncols=True,
        )
    for j in todo:
        per_example = _shard_rows(w, w.shard_examples(j), bar)
        counts = [rows[STORED[w.mode][0]].shape[0] for rows in per_example]
        tensors = {"offsets": torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)}
        for name in STORED[w.mode]:
            tensors[name] = torch.cat([rows[name] for rows in per_example])
        _atomic_save(tensors, w.root / _shard_name(j), w.stamp(j))
    if bar is not None:
        bar.close()


def _shard_rows(w: _Writer, shard: list[D.Example], bar: Any) -> list[dict[str, Tensor]]:
    """The stored rows of each example of a shard, in example order."""
    batch_size = w.config.cache.batch_size or w.config.train.batch_size
    dtype = getattr(torch, resolved_dtype(w.config))
    # Longest first, so batches pad little; rows are put back in example order.
    order = sorted(range(len(shard)), key=lambda i: -len(shard[i].input_ids))
    per_example: list[dict[str, Tensor]] = [{} for _ in shard]
    for b in range(0, len(shard), batch_size):
        chosen = order[b : b + batch_size]
        batch = {
            k: v.to(w.acc.device)
            for k, v in D.collate(
                [shard[i] for i in chosen], w.tokenizer.pad_token_id, packed=False
            ).items()
        }
        rows = teacher_rows(
            w.teacher, batch, w.mode, vocab_size=w.vocab, k=w.config.cache.k, dtype=dtype
        )
        counts = (batch["labels"] != D.IGNORE_INDEX).sum(1).tolist()
        for name, value in rows.items():
            for i, part in zip(chosen, value.cpu().split(counts)):
                per_example[i][name] = part
        if bar is not None:
            bar.update(sum(len(shard[i].input_ids) for i in chosen) * w.acc.num_processes)
    return per_example


def _write_manifest(w: _Writer) -> None:
    """The manifest, from the shards on disk (each checked or written by this run)."""
    shards = []
    for j in range(w.num_shards):
        path = w.root / _shard_name(j)
        offsets = _read_tensor(path, "offsets")
        shards.append(
            {
                "file": path.name,
                "first_example": w.shard_range(j)[0],
                "num_examples": offsets.numel() - 1,
                "num_rows": int(offsets[-1]),
                "bytes": path.stat().st_size,
                "sha256": CK.file_sha256(path),
            }
        )
    manifest = {
        **w.ident,
        "identity": w.key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "examples_per_shard": w.per_shard,
        "id_bytes": id_bytes(w.vocab),
        "hidden_size": w.teacher.config.hidden_size,
        "shards": shards,
    }
    if w.mode == "hidden":
        manifest["head"] = {
            "file": HEAD,
            "bytes": (w.root / HEAD).stat().st_size,
            "sha256": CK.file_sha256(w.root / HEAD),
        }
    _atomic_write_text(w.root / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _read_tensor(path: Path, name: str) -> Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
class TeacherCache:
    """A written teacher cache, read shard by shard (memory-mapped) as teacher sources.

    Opening checks the manifest and that every shard file exists with its recorded size; a
    shard's SHA-256 is checked the first time it is read (``verify``).

    Args:
        path: the cache directory.
        verify: check each shard's SHA-256 when first read.

    Raises:
        CacheError: no manifest, an unknown format, a missing or truncated file.
    """

    def __init__(self, path: str | Path, *, verify: bool = True) -> None:
        self.root = Path(path)
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise CacheError(
                f"{self.root}: no teacher cache here ({MANIFEST} is missing); "
                f"write one with taid-cache-teacher --config ..."
            )
        try:
            self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{manifest} is corrupt ({e}); rewrite the cache") from None
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise CacheError(
                f"{manifest}: format version {self.manifest.get('format_version')}"
                f" is not {FORMAT_VERSION}; rewrite the cache with this taid"
            )
        self.verify = verify
        self.shards = self.manifest["shards"]
        files = list(self.shards) + ([self.manifest["head"]] if "head" in self.manifest else [])
        for entry in files:
            path_j = self.root / entry["file"]
            if not path_j.is_file():
                raise CacheError(
                    f"teacher cache {self.root}: {entry['file']} is missing; rerun "
                    f"taid-cache-teacher with the same config to write it again"
                )
            size = path_j.stat().st_size
            if size != entry["bytes"]:
                raise CacheError(
                    f"teacher cache {self.root}: {entry['file']} has {size} bytes, "
                    f"the manifest says {entry['bytes']} (truncated or replaced); "
                    f"delete it and rerun taid-cache-teacher to write it again"
                )
        self._starts = [s["first_example"] for s in self.shards]
        self._open: dict[int, tuple[Any, list[int]]] = {}
        self._head: dict[str, Tensor] | None = None

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def num_examples(self) -> int:
        return self.manifest["num_examples"]

    def bytes_per_token(self) -> float:
        """Shard bytes per stored row (the head, stored once, not counted)."""
        rows = sum(s["num_rows"] for s in self.shards)
        return sum(s["bytes"] for s in self.shards) / max(rows, 1)

    def check(self, run: dict[str, Any], teacher_weights_sha256: str | None = None) -> None:
        """Raise :class:`CacheError` naming the first field of ``run`` (see :func:`identity`)
        that differs from the manifest, and the teacher's weights when their hash is given."""
        compare(self.manifest, run, str(self.root))
        if (
            teacher_weights_sha256 is not None
            and teacher_weights_sha256 != self.manifest["teacher_weights_sha256"]
        ):
            raise CacheError(
                f"teacher cache {self.root}: teacher_weights_sha256 differs (cache: "
                f"{self.manifest['teacher_weights_sha256'][:12]}..., this run's "
                f"teacher: {teacher_weights_sha256[:12]}...); the teacher's weights "
                f"changed: rewrite the cache"
            )

    def _verified(self, entry: dict[str, Any]) -> Path:
        path = self.root / entry["file"]
        if self.verify and CK.file_sha256(path) != entry["sha256"]:
            raise CacheError(
                f"teacher cache {self.root}: {entry['file']} is corrupt (its SHA-256 "
                f"differs from the manifest's); delete it and rerun "
                f"taid-cache-teacher with the same config to write it again"
            )
        return path

    def _shard(self, j: int) -> tuple[Any, list[int]]:
        if j not in self._open:
            from safetensors import safe_open

            handle = safe_open(str(self._verified(self.shards[j])), framework="pt")
            self._open[j] = (handle, handle.get_tensor("offsets").tolist())
        return self._open[j]

    def example_rows(self, example_ids: Sequence[int] | Tensor) -> dict[str, Tensor]:
        """The stored tensors of these examples, concatenated in the given order."""
        ids = example_ids.tolist() if isinstance(example_ids, Tensor) else list(example_ids)
        parts: dict[str, list[Tensor]] = {name: [] for name in STORED[self.mode]}
        for i in ids:
            if not 0 <= i < self.num_examples:
                raise CacheError(
                    f"example {i} is not in the teacher cache {self.root} "
                    f"({self.num_examples} examples)"
                )
            j = bisect.bisect_right(self._starts, i) - 1
            handle, offsets = self._shard(j)
            local = i - self._starts[j]
            a, b = offsets[local], offsets[local + 1]
            for name in parts:
                parts[name].append(handle.get_slice(name)[a:b])
        if not ids:  # an all-ignored filler batch
            handle, _ = self._shard(0)
            return {name: handle.get_slice(name)[0:0] for name in parts}
        return {name: torch.cat(p) for name, p in parts.items()}

    def head(self, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """The teacher's output layer (``hidden`` mode): ``weight`` and maybe ``bias``."""
        if self._head is None:
            from safetensors.torch import load_file

            self._head = load_file(str(self._verified(self.manifest["head"])))
        return {k: v.to(device) for k, v in self._head.items()}

    def source(
        self,
        example_ids: Sequence[int] | Tensor,
        labels: Tensor,
        *,
        ignore_index: int = D.IGNORE_INDEX,
    ) -> S.TeacherSource:
        """The teacher for a batch: ``example_ids`` in the batch's row-major order and its
        ``labels`` (whose valid positions the rows correspond to), on ``labels``' device.

        Raises:
            CacheError: the rows and the batch's target tokens do not correspond one to one
                (the data changed since the cache was written).
        """
        rows = self.example_rows(example_ids)
        device = labels.device
        inner: S.TeacherSource
        if self.mode == "topk":
            inner = S.TopKTeacher(
                rows["log_probs"].to(device), unpack_ids(rows["ids"].to(device)), self.vocab_size
            )
        elif self.mode == "hidden":
            head = self.head(device)
            inner = S.LinearTeacher(
                rows["hidden"].to(device, head["weight"].dtype), head["weight"], head.get("bias")
            )
        else:
            inner = S.LogitsTeacher(rows["logits"].to(device))
        valid = (labels != ignore_index).reshape(-1)
        if inner.num_rows != int(valid.sum()):
            ids = example_ids.tolist() if isinstance(example_ids, Tensor) else list(example_ids)
            raise CacheError(
                f"the teacher cache holds {inner.num_rows} target rows for examples "
                f"{ids[:8]}{'...' if len(ids) > 8 else ''} but the batch has "
                f"{int(valid.sum())} target tokens: the data or its tokenization "
                f"changed since the cache was written; rewrite it"
            )
        return S.ValidRowsTeacher(inner, valid)


def teacher_cross_entropy(
    source: S.TeacherSource, labels: Tensor, width: int, *, ignore_index: int = D.IGNORE_INDEX
) -> Tensor:
    """Summed ``-log p_T(label)`` over the valid positions of ``labels`` (float64 scalar),
    chunk by chunk from any teacher source."""
    total = torch.zeros((), dtype=torch.float64, device=labels.device)
    for rows, y in C.valid_chunks(labels, width, ignore_index):
        logp = torch.log_softmax(source.rows(rows, width), -1)
        total -= logp.gather(1, y.unsqueeze(1)).double().sum()
    return total


__all__ = [
    "CacheError",
    "TeacherCache",
    "compare",
    "identity",
    "id_bytes",
    "pack_ids",
    "teacher_cross_entropy",
    "unpack_ids",
    "write_cache",
]
