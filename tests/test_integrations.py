"""taid.integrations.transformers.TAIDTrainer on tiny models."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from taid import functional as TF
from taid.integrations.transformers import STATE_FILE, TAIDTrainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example():
    sys_argv = sys.argv
    sys.argv = ["hf_trainer.py"]
    try:
        return runpy.run_path(str(ROOT / "examples" / "hf_trainer.py"))
    finally:
        sys.argv = sys_argv


def make_trainer(example, out: Path, steps: int, **kw) -> TAIDTrainer:
    from transformers import TrainingArguments

    torch.manual_seed(0)
    teacher = example["tiny_llama"](96, 2)
    student = example["tiny_llama"](48, 1)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_steps=3,
        report_to=[],
        seed=0,
        use_cpu=True,
        **kw.pop("args", {}),
    )
    return TAIDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=example["CountingDataset"](64, seed=0),
        eval_dataset=example["CountingDataset"](8, seed=1),
        **kw,
    )


@pytest.mark.slow
def test_example_runs_and_t_moves_once_per_optimizer_step(example, tmp_path):
    trainer = example["main"](steps=6, output_dir=str(tmp_path))
    sched = trainer.loss_fn.scheduler
    assert sched.num_steps == 6  # 6 optimizer steps of 2 micro-batches each
    assert trainer.loss_fn.t == pytest.approx(0.4 + 0.6 * 5 / 6)
    logged = [h for h in trainer.state.log_history if "t" in h]
    assert logged and all({"t_next", "dt", "momentum", "distill"} <= set(h) for h in logged)
    assert (tmp_path / "checkpoint-6" / STATE_FILE).is_file()


@pytest.mark.slow
def test_evaluation_never_moves_t(example, tmp_path):
    trainer = make_trainer(example, tmp_path, steps=2)
    trainer.evaluate()  # before training: no schedule yet, nothing moves
    trainer.train()
    before = trainer.loss_fn.scheduler.state_dict()
    trainer.evaluate()
    assert trainer.loss_fn.scheduler.state_dict() == before


@pytest.mark.slow
def test_resume_from_checkpoint_restores_the_schedule(example, tmp_path):
    full = make_trainer(example, tmp_path / "full", steps=6)
    full.train()
    from transformers import TrainerCallback

    class StopAfter3(TrainerCallback):  # an interruption: the run was meant to last 6 steps
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 3
            control.should_save = control.should_save or state.global_step == 3
            return control

    part = make_trainer(example, tmp_path / "part", steps=6, callbacks=[StopAfter3()])
    part.train()
    saved = json.loads((tmp_path / "part" / "checkpoint-3" / STATE_FILE).read_text())
    assert saved["num_steps"] == 3
    resumed = make_trainer(example, tmp_path / "part", steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3"))
    a, b = full.loss_fn.scheduler.state_dict(), resumed.loss_fn.scheduler.state_dict()
    assert b["num_steps"] == 6
    assert b["t"] == pytest.approx(a["t"], abs=1e-9)
    for (name, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_compute_loss_divides_by_num_items_in_batch(example, tmp_path):
    trainer = make_trainer(example, tmp_path, steps=1)
    trainer._start_training()
    batch = torch.utils.data.default_collate([trainer.train_dataset[i] for i in range(4)])
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(50))
    with torch.no_grad():
        s = trainer.model(input_ids=batch["input_ids"]).logits[:, :-1]
        t = trainer.teacher(input_ids=batch["input_ids"]).logits[:, :-1]
    expected = TF.taid_loss(s, t, batch["labels"][:, 1:], t=0.4, reduction="sum") / 50
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["taid", "jsd", "sft"])
def test_fused_path_equals_the_logits_path(example, tmp_path, monkeypatch, loss):
    """In training TAIDTrainer computes the loss from the hidden states and output layer (the
    logits are never formed); it equals the logits path in value and gradients, and
    ``fused=False`` or a call that wants the outputs takes the logits path."""
    from taid import models as M

    calls = []
    final_hidden = M.final_hidden
    monkeypatch.setattr(M, "final_hidden", lambda *a, **k: calls.append(1) or final_hidden(*a, **k))
    results = {}
    for fused in (None, False):
        trainer = make_trainer(example, tmp_path / str(fused), steps=1, loss=loss, fused=fused)
        trainer._start_training()
        batch = torch.utils.data.default_collate([trainer.train_dataset[i] for i in range(4)])
        calls.clear()
        value = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(50))
        value.backward()
        # the student's hidden states, and the teacher's (its head is plain too)
        assert len(calls) == (0 if fused is False else 1 if loss == "sft" else 2)
        grads = [p.grad.clone() for p in trainer.model.parameters()]
        results[fused] = (value.detach(), grads)
        _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        assert outputs.logits.shape[:2] == batch["input_ids"].shape  # the logits path
    (a, grads_a), (b, grads_b) = results[None], results[False]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_fused_true_says_why_it_cannot_apply(example, tmp_path):
    trainer = make_trainer(
        example, tmp_path, steps=1, loss="fkl", loss_kwargs={"implementation": "eager"}, fused=True
    )
    trainer._start_training()
    batch = torch.utils.data.default_collate([trainer.train_dataset[i] for i in range(4)])
    with pytest.raises(
        ValueError, match=r"fused=True\): the loss runs with implementation='eager'"
    ):
        trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(50))


def test_baselines_can_replace_taid(example, tmp_path):
    trainer = make_trainer(example, tmp_path, steps=2, loss="skl", loss_kwargs={"alpha": 0.2})
    trainer.train()
    assert trainer.loss_fn.divergence == "skl" and trainer.loss_fn.alpha == 0.2


def test_custom_ignore_index_is_refused(example, tmp_path):
    from taid import build_loss

    with pytest.raises(ValueError, match="ignore_index=-100"):
        make_trainer(example, tmp_path, steps=1, loss="fkl", loss_kwargs={"ignore_index": 0})
    with pytest.raises(ValueError, match="ignore_index=-100"):
        make_trainer(example, tmp_path, steps=1, loss=build_loss("fkl", ignore_index=0))
    with pytest.raises(ValueError, match="does not take"):
        make_trainer(example, tmp_path, steps=1, loss="taid", loss_kwargs={"temprature": 2.0})


def test_a_loss_with_parameters_of_its_own_is_refused(example, tmp_path):
    # CTKD's temperature would never train: the Trainer optimises the model's parameters only
    with pytest.raises(ValueError, match="CTKDLoss has parameters of its own.*taid-train"):
        make_trainer(example, tmp_path, steps=1, loss="ctkd")


@pytest.mark.slow
def test_trainer_integration_matches_our_loop(tmp_path):
    """Same initial weights, the same batches in the same order, the same optimizer and
    schedule: TAIDTrainer and taid's own loop give the same t trajectory and final weights.
    The loop here uses the fused loss, the Trainer the logits path: equal up to float32."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, TrainingArguments

    from taid import data as D
    from taid import trainer as T
    from taid.config import load_config

    config = load_config(
        ROOT / "configs" / "smoke.yaml",
        [
            f"output_dir={tmp_path / 'ours'}",
            "train.eval_every=0",
            "train.save_every=0",
            "data.eval_size=0",
            "log.plot=false",
        ],
    )
    initial = T.build(config)
    student0 = {k: v.clone() for k, v in initial.student.state_dict().items()}
    teacher = initial.teacher
    ours = T.train(config)
    final_ours = load_file(str(Path(ours["final_dir"]) / "model.safetensors"))
    t_ours = [
        json.loads(line)["t"]
        for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]

    # The examples in the order our loop consumed them, as transformers-style rows.
    tc = config.train
    stream = D.BatchStream(
        initial.train_examples, tc.batch_size, seed=config.seed, pad_id=0, packed=False
    )
    order = stream.order(0)
    n = tc.max_steps * tc.grad_accum * tc.batch_size
    assert n <= stream.batches_per_epoch * tc.batch_size  # one epoch suffices here
    rows = [initial.train_examples[i] for i in order[:n]]
    pad = initial.tokenizer.pad_token_id

    def collate(batch):
        out = D.collate(batch, pad, packed=False)
        hf_labels = torch.full_like(out["input_ids"], -100)  # unshifted, as transformers wants
        hf_labels[:, 1:] = out["labels"][:, :-1]
        return {
            "input_ids": out["input_ids"],
            "attention_mask": out["attention_mask"],
            "labels": hf_labels,
        }

    class InOrder(TAIDTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    student = AutoModelForCausalLM.from_config(initial.student.config)
    student.load_state_dict(student0)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=tc.max_steps,
        per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.grad_accum,
        learning_rate=tc.lr,
        adam_beta1=tc.betas[0],
        adam_beta2=tc.betas[1],
        weight_decay=tc.weight_decay,
        lr_scheduler_type=tc.lr_scheduler,
        warmup_steps=tc.warmup_steps,
        max_grad_norm=tc.max_grad_norm,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=config.seed,
        use_cpu=True,
        dataloader_drop_last=True,
    )
    hf = InOrder(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=rows,
        data_collator=collate,
        loss="taid",
        loss_kwargs=dict(config.loss.params),
    )
    hf.train()
    t_hf = [h["t"] for h in hf.state.log_history if "t" in h]
    # both log the t each step trained with, under the same key
    assert t_hf == pytest.approx(t_ours, abs=1e-9)
    final_hf = hf.model.state_dict()
    assert set(final_ours) <= set(final_hf) and final_ours
    for name, p in final_ours.items():
        torch.testing.assert_close(
            final_hf[name], p, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.slow
def test_trl_sft_example(tmp_path, monkeypatch):
    """TAIDTrainerMixin on TRL's SFTTrainer: TRL's batches (unshifted labels) drive TAID."""
    pytest.importorskip("trl")
    monkeypatch.setattr(sys, "argv", ["trl_sft.py"])
    module = runpy.run_path(str(ROOT / "examples" / "trl_sft.py"))
    trainer = module["main"](steps=3, output_dir=str(tmp_path))
    assert trainer.loss_fn.scheduler.num_steps == 3
    assert trainer.loss_fn.t == pytest.approx(0.4 + 0.6 * 2 / 3)
    assert any("t" in h for h in trainer.state.log_history)


def test_a_prebuilt_loss_sized_for_another_run_is_refused(example, tmp_path):
    from taid import TAIDLoss

    trainer = make_trainer(example, tmp_path, steps=2, loss=TAIDLoss(total_steps=1000))
    with pytest.raises(ValueError, match=r"total_steps=1000, but this Trainer runs 2"):
        trainer.train()


def test_a_batch_without_labels_is_named(example, tmp_path):
    trainer = make_trainer(example, tmp_path, steps=1)
    batch = {"input_ids": torch.tensor([[1, 2, 3]])}
    with pytest.raises(ValueError, match=r"needs 'labels' in every batch.*\['input_ids'\]"):
        trainer.compute_loss(trainer.model, batch)


def test_stepping_past_total_steps_warns_once():
    import warnings

    from taid import TAIDScheduler

    sched = TAIDScheduler(total_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            sched.step(1.0)
    assert len([w for w in caught if "once per optimizer step" in str(w.message)]) == 1
