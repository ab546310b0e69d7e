"""Student-generated responses (on-policy distillation): targets, schedule, recipes, resume,
several processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch import Killed, kill_at_step, two_processes

from taid import data as D
from taid import student_data as SD
from taid import trainer as T
from taid.config import ConfigError, StudentDataConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
ON = ["student_data.fraction=0.5", "student_data.max_new_tokens=8"]
QUIET = ["log.trackers=[]", "log.plot=false"]


def smoke(out: Path, *overrides: str):
    return load_config(SMOKE, [f"output_dir={out}", *QUIET, *overrides])


def rows(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [r for r in T.read_metrics(out / name) if "loss" in r]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# --------------------------------------------------------------------------------------------
# Prompts, generation, targets
# --------------------------------------------------------------------------------------------
def test_only_the_generated_tokens_are_targets():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
    )
    examples = [
        D.Example([1, 5, 6, 7, 9, 2], [0, 0, 0, 1, 1, 1]),
        D.Example([1, 8, 3, 4], [0, 0, 1, 1]),
    ]
    batch = D.collate(examples, pad_id=0, packed=False)
    prompts = SD.prompts_of(batch)
    assert prompts == [[1, 5, 6], [1, 8]]  # up to the position predicting the first target
    cfg = StudentDataConfig(fraction=1.0, max_new_tokens=5, temperature=1.0)
    eos = [2]
    out = SD.generate(model, prompts, cfg, pad_id=0, eos_ids=eos, max_length=7)
    for prompt, ex in zip(prompts, out):
        assert ex.input_ids[: len(prompt)] == prompt
        assert ex.targets == [0] * len(prompt) + [1] * (len(ex.input_ids) - len(prompt))
        response = ex.input_ids[len(prompt) :]
        assert 1 <= len(response) <= min(5, 7 - len(prompt))
        assert all(t not in eos for t in response[:-1])  # stops at the first end of sequence
    labels = D.collate(out, pad_id=0, packed=False)["labels"]
    for r, (prompt, ex) in enumerate(zip(prompts, out)):
        targets = labels[r][labels[r] != -100].tolist()
        assert targets == ex.input_ids[len(prompt) :]


def test_the_adaptive_schedule_rises_when_the_held_out_loss_stops_improving():
    data = SD.StudentData(
        StudentDataConfig(fraction=0.0, adaptive=True, adaptive_step=0.1),
        seed=0,
        total_steps=10,
        pad_id=0,
        eos_ids=[2],
        max_length=16,
    )
    for loss in (3.0, 2.5, 2.6, 2.4, 2.4):
        data.after_eval(loss)
    assert data.fraction == pytest.approx(0.2)
    state = data.state_dict()
    other = SD.StudentData(data.cfg, seed=0, total_steps=10, pad_id=0, eos_ids=[2], max_length=16)
    other.load_state_dict(json.loads(json.dumps(state)))
    assert other.state_dict() == state


@pytest.mark.parametrize(
    "override, match",
    [
        ("teacher.source=cache", "score the student.s generations online"),
        ("data.packing=true", "packing=false"),
        ("loss.name=sft", "choose a distillation loss"),
        ("student_data.adaptive=true", "train.eval_every > 0"),
        ("student_data.replay_ratio=0.5", "replay_size"),
    ],
)
def test_settings_that_cannot_work_are_refused(override, match):
    extra = ["teacher.cache_dir=/tmp/x"] if "cache" in override else []
    if "adaptive" in override:
        extra.append("train.eval_every=0")
    with pytest.raises(ConfigError, match=match):
        load_config(SMOKE, [*ON, override, *extra])


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------
def test_recipes_set_the_loss_and_student_data_sections():
    gkd = load_config(SMOKE, ["recipe=gkd"])
    assert gkd.loss.name == "jsd" and gkd.loss.params == {"beta": 0.1}
    assert gkd.student_data.fraction == 0.5
    distillm = load_config(SMOKE, ["recipe=distillm", "loss.alpha=0.2"])
    assert distillm.loss.name == "skl" and distillm.loss.params == {"alpha": 0.2}
    assert distillm.student_data.adaptive and distillm.student_data.replay_size == 1000
    with pytest.raises(ConfigError, match="did you mean 'gkd'"):
        load_config(SMOKE, ["recipe=gdk"])
    # a whole section the recipe sets would silently undo it (the loss back to the default)
    for section in ("loss={}", "student_data={fraction: 0.2}"):
        with pytest.raises(ConfigError, match="replaces the whole .* section, which recipe 'gkd'"):
            load_config(SMOKE, [section, "recipe=gkd"])


@pytest.mark.slow
def test_gkd_with_lambda_zero_is_off_policy_jsd(tmp_path):
    a = T.train(smoke(tmp_path / "gkd", "recipe=gkd", "student_data.fraction=0"))
    b = T.train(smoke(tmp_path / "jsd", "loss.name=jsd", "loss.beta=0.1"))
    ra, rb = rows(tmp_path / "gkd"), rows(tmp_path / "jsd")
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    wa, wb = weights(Path(a["final_dir"])), weights(Path(b["final_dir"]))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------------------------
# Training on student generations: resume, several processes
# --------------------------------------------------------------------------------------------
STUDENT_RUN = [
    *ON,
    "student_data.replay_size=16",
    "student_data.replay_ratio=1.0",
    "student_data.adaptive=true",
    "train.max_steps=8",
    "train.eval_every=2",
    "train.save_every=2",
    "train.keep_checkpoints=3",
]


@pytest.mark.slow
def test_a_killed_run_on_student_generations_resumes_to_the_same_weights(tmp_path, monkeypatch):
    full = T.train(smoke(tmp_path / "a", *STUDENT_RUN))
    kinds = [r["student_batches"] for r in rows(tmp_path / "a")]
    assert sum(kinds) > 0 and len(full["setup"].student_data.buffer) > 0

    kill_at_step(monkeypatch, 5)
    config = smoke(tmp_path / "b", *STUDENT_RUN)
    with pytest.raises(Killed):
        T.train(config)
    monkeypatch.undo()
    resumed = T.train(config)
    assert resumed["setup"].student_data.state_dict() == full["setup"].student_data.state_dict()
    assert [r["loss"] for r in rows(tmp_path / "b")] == [r["loss"] for r in rows(tmp_path / "a")]
    wa, wb = weights(Path(full["final_dir"])), weights(Path(resumed["final_dir"]))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_two_processes_generate_and_train_together(tmp_path):
    out = tmp_path / "two"
    proc = two_processes(
        ROOT / "scripts" / "train.py",
        "--config",
        str(SMOKE),
        f"output_dir={out}",
        "train.batch_size=2",
        *STUDENT_RUN,
        *QUIET,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = rows(out), rows(out, "metrics.rank1.jsonl")
    assert len(rank0) == len(rank1) == 8
    for r0, r1 in zip(rank0, rank1):
        assert r0["loss"] == r1["loss"] and r0["t"] == r1["t"]
    assert sum(r["student_batches"] for r in rank0) > 0
    assert (out / "checkpoints" / "step-00000008" / "rank-1.json").is_file()
