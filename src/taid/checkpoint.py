"""Training checkpoints that load without unpickling anything.

A checkpoint is a directory ``checkpoints/step-NNNNNNNN/``:

- ``model.safetensors``: the student's full state dict (a tensor shared by several names, such
  as tied input and output embeddings, is stored once; ``state.json`` lists the aliases).
- ``state.safetensors`` + ``state.json``: everything else this library owns: optimizer state
  (keyed by parameter name, so it survives a change of wrapper), LR schedule, the loss's state
  (TAID's t, momentum, previous loss; learned parameters of a loss), the train state (step, data
  position, history), gradient-scaler state and the run's config. Tensors go to safetensors,
  the structure around them to JSON that :func:`decode` rebuilds from plain types only.
- ``rank-{r}.safetensors`` + ``rank-{r}.json``: each process's own state: its random-number
  state (torch CPU and CUDA, Python's ``random``, NumPy's legacy generator) and what the loop
  keeps per process (the replay buffer of student generations).
- ``checkpoint.json``, written last: the format version, the step, and the size and SHA-256 of
  every other file. A directory without it is incomplete and never loaded; a file whose size or
  hash differs makes the checkpoint corrupt.

Nothing here calls ``pickle``, ``torch.load`` or accelerate's ``load_state``: a checkpoint
handed to the trainer can hold data, never code. A directory is written under a temporary name
and renamed into place; an existing checkpoint of the same step is moved aside, not deleted,
until its replacement is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT = 1
PREFIX = "step-"
MANIFEST = "checkpoint.json"
MODEL_FILE = "model.safetensors"
STATE_FILES = ("state.safetensors", "state.json")
OLD_FORMAT_MARKER = "COMPLETE"  # accelerate's pickled format, written by taid 0.1


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, of another format, or of another run."""


# --------------------------------------------------------------------------------------------
# Plain structures with tensors <-> JSON + a flat dict of tensors
# --------------------------------------------------------------------------------------------
def encode(obj: Any, tensors: dict[str, Tensor], prefix: str = "t") -> Any:
    """A JSON-serialisable copy of ``obj`` with every tensor moved into ``tensors``.

    Handles dicts (any keys of str, int, float, bool or None), lists, tuples, str, int, float
    (inf and NaN included), bool, None and tensors; anything else is refused, so that nothing
    needs a general deserialiser to come back. A tensor that shares its storage, offset, shape
    and strides with one already stored (tied weights) is stored once and referenced twice.
    """
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    for key, value in tensors.items():
        seen[_tensor_key(value)] = key
    return _encode(obj, tensors, prefix, seen)


def _tensor_key(t: Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    return (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape), t.stride())


def _encode(
    obj: Any,
    tensors: dict[str, Tensor],
    path: str,
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str],
) -> Any:
    if isinstance(obj, Tensor):
        t = obj.detach()
        ident = _tensor_key(t) if t.numel() else None
        if ident is not None and ident in seen:
            return {"__tensor__": seen[ident]}
        tensors[path] = t.cpu().contiguous()
        if ident is not None:
            seen[ident] = path
        return {"__tensor__": path}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}", seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}", seen) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}", seen) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"cannot store a dict key of type {type(k).__name__} at {path}")
            items.append([k, _encode(v, tensors, f"{path}.{k}", seen)])
        return {"__items__": items}
    raise TypeError(
        f"cannot store a {type(obj).__name__} at {path} in a checkpoint "
        f"(only tensors, numbers, strings, lists, tuples and dicts)"
    )


def decode(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: decode(v, tensors) for k, v in obj["__items__"]}
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


def save_tree(obj: Any, directory: Path, name: str) -> None:
    """Write ``obj`` as ``name.safetensors`` (its tensors) and ``name.json`` (the rest)."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    tree = encode(obj, tensors)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(tree, sort_keys=True) + "\n")


def load_tree(directory: Path, name: str) -> Any:
    """Read what :func:`save_tree` wrote."""
    from safetensors.torch import load_file

    tensors = load_file(str(directory / f"{name}.safetensors"))
    return decode(json.loads((directory / f"{name}.json").read_text()), tensors)


# --------------------------------------------------------------------------------------------
# Random-number state
# --------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's random-number state, as plain values and tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
        state["numpy"] = [
            kind,
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        ]
    except ImportError:
        pass
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


# --------------------------------------------------------------------------------------------
# Files, hashes, completeness
# --------------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def step_of(path: Path) -> int | None:
    """The step in a checkpoint directory's name, or None if it is not one."""
    name = path.name
    if not name.startswith(PREFIX) or not name[len(PREFIX) :].isdigit():
        return None
    return int(name[len(PREFIX) :])


def write_manifest(directory: Path, step: int, extra: Mapping[str, Any] | None = None) -> None:
    """Record every file's size and hash in ``checkpoint.json``; written last (atomically)."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": FORMAT, "step": step, "files": files, **(extra or {})}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, directory / MANIFEST)


def verify(directory: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint whose files all match it.

    Raises:
        CheckpointError: no manifest (incomplete, or the old pickled format), a missing file,
            or a file whose size or SHA-256 differs from the manifest.
    """
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        if (directory / OLD_FORMAT_MARKER).is_file():
            raise CheckpointError(
                f"{directory} was written by taid 0.1 in accelerate's pickled format, which "
                f"this version never loads (a pickle can run code); start the run again with "
                f"overwrite=true, or resume it with taid 0.1"
            )
        raise CheckpointError(
            f"{directory} is incomplete (no {MANIFEST}): the save was interrupted"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{directory}: checkpoint format {manifest.get('format')!r}, "
            f"this version reads format {FORMAT}"
        )
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise CheckpointError(
                f"{path} is corrupt: its size or SHA-256 differs from the "
                f"one recorded when it was written"
            )
    return manifest


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` has a manifest (its hashes are checked on load, not here)."""
    return (directory / MANIFEST).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories in ``root`` with a manifest, oldest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None and is_complete(p)]
    return sorted(found, key=lambda p: step_of(p) or 0)


def recover(root: Path) -> None:
    """Undo a save interrupted while it swapped directories in ``root``: a directory moved
    aside (``.old-NAME``) whose replacement never arrived is put back; half-written
    ``.tmp-NAME`` directories are removed. Safe to call from several processes at once."""
    if not root.is_dir():
        return
    for aside in root.glob(".old-*"):
        final = root / aside.name[len(".old-") :]
        try:
            if final.exists():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(aside, final)
        except FileNotFoundError:  # another process got there first
            pass
    for tmp in root.glob(".tmp-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """Move a finished directory ``tmp`` to ``final``. An existing ``final`` is moved aside
    first and deleted only once the new one is in place, so that a kill at any moment leaves
    one complete copy (:func:`recover` restores it)."""
    aside = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def prune(root: Path, newest: Path, keep: int) -> list[Path]:
    """Delete checkpoints older than ``newest`` beyond the ``keep`` most recent (``newest``
    included). Checkpoints of later steps (left by another history of the run) are never
    counted in its place. Returns the directories deleted."""
    step = step_of(newest)
    assert step is not None
    older = [p for p in list_checkpoints(root) if (step_of(p) or 0) < step]
    doomed = older[: max(len(older) - (keep - 1), 0)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# --------------------------------------------------------------------------------------------
# Saving and loading a training run
# --------------------------------------------------------------------------------------------
def _split_aliases(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors by name with each storage once, and ``{alias: stored name}`` for the rest."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, t in state.items():
        key = _tensor_key(t)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t.detach().cpu().contiguous()
    return tensors, aliases


def full_state_dicts(
    model: torch.nn.Module, optimizer: Any = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's (and optimizer's) full, unsharded state dicts on the main process (empty
    elsewhere under FSDP), on CPU; a collective under FSDP, so every process calls it.

    Parameters tied in the model (input and output embeddings) are the same tensor in the
    result, whatever the wrapper gathered, so that savers store them once and keep them tied.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state: dict[str, Any]
    optim_state: dict[str, Any] = {}
    if optimizer is None:
        model_state = dict(get_model_state_dict(model, options=options))
    else:
        model_state, optim_state = (
            dict(x) for x in get_state_dict(model, optimizer, options=options)
        )
    names: dict[int, list[str]] = {}
    for name, param in _unwrapped(model).named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for group in names.values():
        present = [n for n in group if n in model_state]
        for alias in present[1:]:
            model_state[alias] = model_state[present[0]]
    return model_state, optim_state


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP (or similar ``.module``) wrapper; FSDP2 shards in place."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def save(
    acc: Any,
    root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    loss: torch.nn.Module,
    loss_optimizer: Any = None,
    train_state: Mapping[str, Any],
    run: Mapping[str, Any],
    keep: int,
    rank_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``root/step-NNNNNNNN`` (see the module docstring); every process calls it.

    The model and optimizer are gathered to full, unsharded state dicts on the main process
    (``torch.distributed.checkpoint.state_dict``: the same call for one process, DDP and FSDP),
    so a checkpoint does not depend on the number of processes that wrote it. ``run`` is stored
    in the manifest and compared on resume (:func:`manifest_of`). Keeps the newest ``keep``.
    """
    from safetensors.torch import save_file

    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    model_state, optim_state = full_state_dicts(model, optimizer)  # a collective under FSDP
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    if acc.is_main_process:
        tensors, aliases = _split_aliases(model_state)
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        scaler = getattr(acc, "scaler", None)
        save_tree(
            {
                "optimizer": optim_state,
                "scheduler": scheduler.state_dict(),
                "loss": loss.state_dict(),
                "loss_optimizer": None if loss_optimizer is None else loss_optimizer.state_dict(),
                "train": dict(train_state),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "model_aliases": aliases,
            },
            tmp,
            "state",
        )
    save_tree(
        {"rng": rng_state(), "state": dict(rank_state or {})}, tmp, f"rank-{acc.process_index}"
    )
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_manifest(tmp, step, {"run": dict(run), "num_processes": acc.num_processes})
        publish(tmp, final)
        prune(root, final, keep)
    acc.wait_for_everyone()
    return final


def manifest_of(directory: Path) -> dict[str, Any]:
    """A checkpoint's manifest (JSON only, hashes not checked): what :func:`save` recorded."""
    verify_path = directory / MANIFEST
    if not verify_path.is_file():
        verify(directory)  # raises the reason: incomplete, or the old format
    try:
        return dict(json.loads(verify_path.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{verify_path} is not valid JSON ({e})") from None


def load(
    acc: Any,
    directory: Path,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    loss: torch.nn.Module,
    loss_optimizer: Any = None,
) -> dict[str, Any]:
    """Restore what :func:`save` wrote into the given objects (every process calls it, after
    ``accelerator.prepare``); returns the train state, with this process's own
    state (``rank_state`` of :func:`save`; empty when the number of processes changed) under
    ``"rank"``. Every file is checked against its
    recorded SHA-256 before anything is restored.

    Raises:
        CheckpointError: see :func:`verify`.
    """
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    manifest = verify(directory)
    model_state = load_file(str(directory / MODEL_FILE))
    state = load_tree(directory, "state")
    for alias, stored in state["model_aliases"].items():
        model_state[alias] = model_state[stored]
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,  # type: ignore[arg-type]
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    scheduler.load_state_dict(state["scheduler"])
    loss.load_state_dict(state["loss"])
    if loss_optimizer is not None:
        if state.get("loss_optimizer") is None:
            raise CheckpointError(f"{directory} holds no state of the loss's optimizer")
        loss_optimizer.load_state_dict(state["loss_optimizer"])
    scaler = getattr(acc, "scaler", None)
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    own = f"rank-{acc.process_index}"
    rank_state: dict[str, Any] = {}
    if manifest.get("num_processes") == acc.num_processes and (directory / f"{own}.json").is_file():
        saved = load_tree(directory, own)
        set_rng_state(saved["rng"])
        rank_state = dict(saved["state"])
    return {**dict(state["train"]), "rank": rank_state}
