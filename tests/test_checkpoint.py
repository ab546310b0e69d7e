"""Checkpoints: nothing is unpickled, every byte is checked, no kill loses the last good one,
and a resumed run continues the same run wherever its directory now lives."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from launch import Killed, kill_at_step

from taid import checkpoint as CK
from taid import trainer as T
from taid.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
QUIET = ["log.plot=false", "log.trackers=[]"]


def smoke(out: Path, *overrides: str):
    return load_config(SMOKE, [f"output_dir={out}", *QUIET, *overrides])


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def crashed_run(tmp_path: Path, monkeypatch, *overrides: str) -> Path:
    """A smoke run (6 steps, checkpoints every 2) killed in step 5: step-2 and step-4 exist."""
    config = smoke(tmp_path / "run", "train.save_every=2", "train.keep_checkpoints=3", *overrides)
    kill_at_step(monkeypatch, 5)
    with pytest.raises(Killed):
        T.train(config)
    monkeypatch.undo()
    out = Path(config.output_dir)
    assert [p.name for p in T.checkpoints(out)] == ["step-00000002", "step-00000004"]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    T.train(smoke(out, "train.save_every=2", "train.keep_checkpoints=3"))
    return out


# --------------------------------------------------------------------------------------------
# The format: plain JSON and safetensors
# --------------------------------------------------------------------------------------------
def test_encode_decode_round_trip_keeps_types_and_stores_shared_tensors_once():
    w = torch.randn(3, 4)
    obj = {
        "a": [1, 2.5, float("inf"), None, True, "x"],
        "b": (1, (2, 3)),
        "c": {0: w, 1: w, "n": float("nan")},
        "d": w[1:],
        "__odd": 1,
    }
    tensors: dict[str, torch.Tensor] = {}
    tree = CK.encode(obj, tensors)
    assert len(tensors) == 2  # w once, and the view w[1:] (another shape) once
    back = CK.decode(json.loads(json.dumps(tree)), tensors)
    assert back["a"][:2] == [1, 2.5] and back["a"][2] == math.inf and back["a"][3:] == obj["a"][3:]
    assert back["b"] == (1, (2, 3)) and isinstance(back["b"][1], tuple)
    assert set(back["c"]) == {0, 1, "n"} and math.isnan(back["c"]["n"])
    assert torch.equal(back["c"][0], w) and torch.equal(back["d"], w[1:])
    assert back["__odd"] == 1


def test_encode_refuses_objects_that_would_need_a_general_deserialiser():
    class Thing:
        pass

    with pytest.raises(TypeError, match="cannot store a Thing"):
        CK.encode({"x": Thing()}, {})


def test_rng_state_round_trips():
    import random

    import numpy as np

    state = CK.rng_state()
    tensors: dict[str, torch.Tensor] = {}
    tree = json.loads(json.dumps(CK.encode(state, tensors)))
    a = (torch.rand(3), random.random(), np.random.rand())
    CK.set_rng_state(CK.decode(tree, tensors))
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


# --------------------------------------------------------------------------------------------
# Nothing in a checkpoint can run code
# --------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this writes a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "payload ran"))


@pytest.mark.slow
def test_a_planted_pickle_is_never_executed_and_resume_still_matches(
    tmp_path, monkeypatch, uninterrupted
):
    out = crashed_run(tmp_path, monkeypatch)
    marker = tmp_path / "pwned"
    blob = pickle.dumps(Payload(marker))
    newest = T.checkpoints(out)[-1]
    # Every name accelerate's load_state reads, and torch.load/pickle files of ours if any
    for name in (
        "custom_checkpoint_0.pkl",
        "custom_checkpoint_1.pkl",
        "random_states_0.pkl",
        "optimizer.bin",
        "scheduler.bin",
        "scaler.pt",
        "pytorch_model.bin",
    ):
        (newest / name).write_bytes(blob)

    # And no unpickler may run at all while resuming.
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle a file while resuming")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    result = T.train(smoke(out, "train.save_every=2", "train.keep_checkpoints=3"))
    assert result["steps"] == 6
    assert not marker.exists()
    assert_same_weights(uninterrupted / "final", out / "final")


def test_the_library_has_no_path_to_an_unpickler():
    """No module of the library imports a pickle-based loader or calls one: ``torch.load``,
    accelerate's ``load_state`` / ``register_for_checkpointing`` (which pickle custom state)."""
    import ast

    banned_modules = {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
    banned_attributes = {"load_state", "register_for_checkpointing", "load_custom_state"}
    for path in (ROOT / "src" / "taid").rglob("*.py"):
        where = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & banned_modules, where
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in banned_modules, where
            elif isinstance(node, ast.Attribute):
                assert node.attr not in banned_attributes, f"{where}: .{node.attr}"
                is_torch_load = (
                    node.attr == "load"
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "torch"
                )
                assert not is_torch_load, f"{where}: torch.load"
            elif isinstance(node, ast.keyword):
                assert node.arg != "weights_only", f"{where}: weights_only="


def test_a_checkpoint_of_the_old_pickled_format_is_refused_with_the_reason(tmp_path):
    out = tmp_path / "run"
    old = out / "checkpoints" / "step-00000002"
    old.mkdir(parents=True)
    (old / "COMPLETE").write_text("2\n")
    (old / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps({"t": 0.5}))
    with pytest.raises(CK.CheckpointError, match="pickled format.*never loads"):
        T.check_output_dir(smoke(out))


# --------------------------------------------------------------------------------------------
# Corruption is caught; no kill loses the last good checkpoint
# --------------------------------------------------------------------------------------------
def flip_a_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_flipped_byte_in_the_weights_is_caught_and_an_older_checkpoint_used(
    tmp_path, monkeypatch, capsys, uninterrupted
):
    out = crashed_run(tmp_path, monkeypatch)
    newest = T.checkpoints(out)[-1]
    flip_a_byte(newest / "model.safetensors")
    with pytest.raises(CK.CheckpointError, match="model.safetensors is corrupt"):
        CK.verify(newest)
    result = T.train(smoke(out, "train.save_every=2", "train.keep_checkpoints=3"))
    printed = capsys.readouterr().out
    assert "step-00000004 could not be loaded" in printed and "corrupt" in printed
    assert "resumed from" in printed and "step-00000002 at step 2" in printed
    assert result["steps"] == 6
    assert_same_weights(uninterrupted / "final", out / "final")


@pytest.mark.slow
def test_when_checkpoints_exist_and_none_loads_the_run_stops(tmp_path, monkeypatch):
    out = crashed_run(tmp_path, monkeypatch)
    for ckpt in T.checkpoints(out):
        flip_a_byte(ckpt / "state.safetensors", 10)
    with pytest.raises(CK.CheckpointError, match="no checkpoint could be loaded.*step 0"):
        T.train(smoke(out, "train.save_every=2", "train.keep_checkpoints=3"))


def test_a_kill_between_moving_the_old_copy_aside_and_renaming_the_new_one(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    old = root / "step-00000004"
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"old weights")
    CK.write_manifest(old, 4)
    new = root / ".tmp-step-00000004"
    new.mkdir()
    (new / "model.safetensors").write_bytes(b"new weights")
    CK.write_manifest(new, 4)
    real, calls = os.replace, {"n": 0}

    def killed(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # after moving the old one aside, before the new one arrives
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        CK.publish(new, old)
    monkeypatch.setattr(os, "replace", real)
    assert not old.exists() and (root / ".old-step-00000004").is_dir()
    CK.recover(root)
    assert CK.list_checkpoints(root) == [old]
    assert (old / "model.safetensors").read_bytes() == b"old weights"
    assert not new.exists()
    CK.verify(old)


def test_publishing_over_an_existing_checkpoint_replaces_it_whole(tmp_path):
    root = tmp_path / "checkpoints"
    for content, name in ((b"old", "step-00000004"), (b"new", ".tmp-step-00000004")):
        d = root / name
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(content)
        CK.write_manifest(d, 4)
    CK.publish(root / ".tmp-step-00000004", root / "step-00000004")
    assert (root / "step-00000004" / "model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]


def test_pruning_never_deletes_the_new_checkpoint_for_a_stray_later_one(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 99999999):
        d = root / f"step-{step:08d}"
        d.mkdir(parents=True)
        CK.write_manifest(d, step)
    deleted = CK.prune(root, root / "step-00000006", keep=2)
    assert [p.name for p in deleted] == ["step-00000002"]
    assert [p.name for p in CK.list_checkpoints(root)] == [
        "step-00000004",
        "step-00000006",
        "step-99999999",
    ]
    assert CK.prune(root, root / "step-00000006", keep=1)[0].name == "step-00000004"


def test_a_truncated_or_missing_file_is_named(tmp_path):
    d = tmp_path / "step-00000001"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x" * 100)
    (d / "state.json").write_text("{}")
    CK.write_manifest(d, 1)
    (d / "model.safetensors").write_bytes(b"x" * 99)
    with pytest.raises(CK.CheckpointError, match="model.safetensors is corrupt"):
        CK.verify(d)
    (d / "model.safetensors").write_bytes(b"x" * 100)
    CK.verify(d)
    (d / "state.json").unlink()
    with pytest.raises(CK.CheckpointError, match="state.json is missing"):
        CK.verify(d)
    (d / "checkpoint.json").unlink()
    with pytest.raises(CK.CheckpointError, match="incomplete"):
        CK.verify(d)


# --------------------------------------------------------------------------------------------
# The run around the checkpoints: final/, metrics.jsonl, resume checks
# --------------------------------------------------------------------------------------------
def test_final_is_complete_and_checksummed(uninterrupted):
    manifest = CK.verify(uninterrupted / "final")
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["step"] == 6
    assert not list(uninterrupted.glob(".tmp-*")) and not list(uninterrupted.glob(".old-*"))


@pytest.mark.slow
def test_resume_rewrites_metrics_after_the_checkpoint_and_survives_a_torn_line(
    tmp_path, monkeypatch, uninterrupted
):
    out = crashed_run(tmp_path, monkeypatch)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a kill in the middle of a write
    T.train(smoke(out, "train.save_every=2", "train.keep_checkpoints=3"))
    rows = T.read_metrics(out / "metrics.jsonl")
    train_rows = [r["step"] for r in rows if "loss" in r]
    assert train_rows == [1, 2, 3, 4, 5, 6]
    evals = [r["step"] for r in rows if "eval/student_ce" in r]
    assert evals == [0, 3, 6]
    full = [r for r in T.read_metrics(uninterrupted / "metrics.jsonl") if "loss" in r]
    for a, b in zip(full, (r for r in rows if "loss" in r)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["t"] == b["t"]


@pytest.mark.slow
def test_overwrite_starts_new_metrics(tmp_path, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    T.train(smoke(out, "train.max_steps=2", "overwrite=true", "train.save_every=0"))
    steps = [r["step"] for r in T.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2]


@pytest.mark.slow
def test_a_moved_run_directory_resumes(tmp_path, monkeypatch, uninterrupted):
    out = crashed_run(tmp_path, monkeypatch)
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    result = T.train(smoke(moved, "train.save_every=2", "train.keep_checkpoints=3"))
    assert result["steps"] == 6
    assert_same_weights(uninterrupted / "final", moved / "final")


def test_resume_from_a_path_checks_the_config_too(tmp_path, uninterrupted):
    ckpt = T.checkpoints(uninterrupted)[0]
    with pytest.raises(ConfigError, match=r"different config \(train.lr: saved 0.001, now 0.5\)"):
        T.check_output_dir(smoke(tmp_path / "other", f"resume={ckpt}", "train.lr=0.5"))
    assert (
        T.check_output_dir(
            smoke(
                tmp_path / "other",
                f"resume={ckpt}",
                "train.save_every=2",
                "train.keep_checkpoints=3",
            )
        )
        == ckpt
    )
    with pytest.raises(ConfigError, match="different config"):
        T.check_output_dir(smoke(uninterrupted, "train.lr=0.5"))


def test_rerunning_a_finished_run_says_so_and_changes_nothing(
    tmp_path, uninterrupted, capsys, monkeypatch
):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(T, "build", lambda *a: (_ for _ in ()).throw(AssertionError("built")))
    result = T.train(smoke(out, "train.save_every=2", "train.keep_checkpoints=3"))
    assert "holds a finished run" in capsys.readouterr().out
    assert result["finished"] and result["steps"] == 6
    assert result["before"]["step"] == 0 and result["after"]["step"] == 6
    after = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before
