"""TAID (or any registered loss) inside a ``transformers.Trainer`` run.

``TAIDTrainer`` is a drop-in ``Trainer`` that takes a teacher and loss settings::

    trainer = TAIDTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                          train_dataset=..., data_collator=..., loss="taid",
                          loss_kwargs={"t_start": 0.4})
    trainer.train()

What it guarantees:

- The teacher runs in eval mode without gradient, on the student's device, under the same
  autocast as the student.
- In training the loss is computed from the student's last hidden states and output layer
  (the full logits are never formed) when the output layer is a plain linear map; evaluation
  and ``fused=False`` use the logits.
- Labels follow the transformers convention (unshifted, ``-100`` ignored); they are shifted here.
- The loss is summed over tokens and divided by the Trainer's ``num_items_in_batch`` (the valid
  tokens of the whole accumulation window, across devices), so gradient accumulation and data
  parallelism weight every token equally.
- ``t`` advances once per optimizer step (not per micro-batch, never during evaluation), from
  the token-weighted TAID loss of the whole step, all-reduced across ranks.
- ``t``, ``dt``, the momentum and the distillation term are logged through the Trainer's own
  logging; the schedule is saved in every checkpoint (``taid_state.json``) and restored by
  ``trainer.train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from taid import models as M
from taid import sources as S
from taid.losses import DistillationLoss, TAIDLoss, build_loss, loss_parameters

if TYPE_CHECKING:  # the mixin is always combined with a Trainer; let the type checker know
    _TrainerBase = Trainer
else:
    _TrainerBase = object

STATE_FILE = "taid_state.json"
_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


class _StepCallback(TrainerCallback):
    """Builds the loss when training starts (the number of steps is known then) and advances
    the schedule after each optimizer step (the Trainer calls on_step_end then)."""

    def __init__(self, trainer: TAIDTrainerMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.trainer._start_training()
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.trainer._end_optimizer_step()
        return control


class TAIDTrainerMixin(_TrainerBase):
    """The distillation behaviour of :class:`TAIDTrainer`, for any ``transformers.Trainer``
    subclass: ``class MySFT(TAIDTrainerMixin, trl.SFTTrainer): ...`` keeps TRL's data handling
    and replaces its loss. Arguments as :class:`TAIDTrainer`.
    """

    def __init__(
        self,
        *args: Any,
        teacher_model: nn.Module | None = None,
        loss: str | DistillationLoss = "taid",
        loss_kwargs: dict[str, Any] | None = None,
        fused: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._fused = fused
        self._loss_spec = loss
        self._loss_kwargs = dict(loss_kwargs or {})
        self.loss_fn: DistillationLoss | None = loss if isinstance(loss, DistillationLoss) else None
        # fail on bad loss settings now, not when training starts
        self._check_loss(self.loss_fn or self._new_loss(1))
        if (
            teacher_model is None
            and (self.loss_fn is None or self.loss_fn.divergence)
            and loss != "sft"
        ):
            raise ValueError(f"loss {loss!r} needs teacher_model")
        self.teacher = teacher_model
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)
        # We normalise by num_items_in_batch ourselves: make the Trainer always compute it and
        # not divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self._step_sums = torch.zeros(2, dtype=torch.float64)  # distill sum, tokens
        self._last_distill: float | None = None
        self._last_schedule: dict[str, float] = {}
        self.add_callback(_StepCallback(self))

    # -- loss --------------------------------------------------------------------------------
    @staticmethod
    def _check_loss(loss_fn: DistillationLoss | None) -> None:
        if loss_fn is not None and loss_fn.ignore_index != -100:
            raise ValueError(
                "the Trainer counts num_items_in_batch over labels != -100; use "
                "ignore_index=-100 with TAIDTrainer"
            )
        if loss_fn is not None and any(True for _ in loss_fn.parameters()):
            raise ValueError(
                f"{type(loss_fn).__name__} has parameters of its own (a learned temperature); "
                f"the Trainer optimises only the model's, so they would never train. Use "
                f"taid-train, which optimises both"
            )

    def _new_loss(self, total_steps: int) -> DistillationLoss:
        kwargs = dict(self._loss_kwargs)
        if "total_steps" in loss_parameters(str(self._loss_spec)):
            kwargs.setdefault("total_steps", max(total_steps, 1))
        loss_fn = build_loss(str(self._loss_spec), reduction="sum", **kwargs)
        self._check_loss(loss_fn)
        return loss_fn

    def _start_training(self) -> None:
        if self.loss_fn is None:
            self.loss_fn = self._new_loss(int(self.state.max_steps))
        planned = getattr(self.loss_fn, "total_steps", None)
        sched = getattr(self.loss_fn, "scheduler", None)
        planned = sched.total_steps if sched is not None else planned
        given = isinstance(self._loss_spec, DistillationLoss)  # built by the user, not here
        steps = int(self.state.max_steps)
        if given and planned is not None and steps > 0 and planned != steps:
            raise ValueError(
                f"{type(self.loss_fn).__name__} was built with total_steps={planned}, but this "
                f"Trainer runs {self.state.max_steps} optimizer steps: its schedule would not "
                f"reach its end (or would pass it). Build it with "
                f"total_steps={self.state.max_steps}, or pass loss={self._loss_spec!r} by name "
                f"so that TAIDTrainer sizes it"
            )
        self.loss_fn.reduction = "sum"
        state = getattr(self, "_pending_state", None)
        if state is not None and isinstance(self.loss_fn, TAIDLoss):
            # resuming: the schedule continues where the checkpoint left it
            self.loss_fn.scheduler.load_state_dict(state)
            self._pending_state = None

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        # before training starts (an early evaluate()), a loss at the schedule's start
        loss_fn = self.loss_fn or self._new_loss(1)
        loss_fn.reduction = "sum"
        if "labels" not in inputs:
            raise ValueError(
                f"TAIDTrainer needs 'labels' in every batch (the tokens to distil, -100 where "
                f"ignored); this batch has {sorted(inputs)}. Use a collator that adds them, such "
                f"as DataCollatorForLanguageModeling(tokenizer, mlm=False)"
            )
        labels = inputs["labels"]
        # only the model's inputs: collators (TRL's) may add masks the forward does not take
        inputs = {k: inputs[k] for k in _MODEL_INPUTS if k in inputs}
        # transformers labels are unshifted; ours are aligned with the logits (position i
        # predicts targets[i]). Shifting the labels, not the logits, copies no N x V tensor.
        targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], 1)
        outputs = None
        if self._use_fused(model, loss_fn, return_outputs):
            unwrapped = self.accelerator.unwrap_model(model)
            hidden = M.final_hidden(model, unwrapped, **inputs)
            weight, bias = M.plain_linear_head(unwrapped)
            teacher = self._teacher_rows(loss_fn, inputs, hidden.device, fused=True)
            out = loss_fn.compute_fused(hidden, weight, teacher, targets, student_bias=bias)
        else:
            outputs = model(**inputs, use_cache=False)
            teacher = self._teacher_rows(loss_fn, inputs, outputs.logits.device, fused=False)
            out = loss_fn.compute(outputs.logits, teacher, targets)
        denominator: torch.Tensor | int
        if num_items_in_batch is None:
            denominator = out.num_tokens.clamp_min(1)
            scale = 1.0
        else:
            denominator = num_items_in_batch
            # as the Trainer does: num_items_in_batch counts every device, DDP averages
            scale = (
                self.accelerator.num_processes if self.args.average_tokens_across_devices else 1.0
            )
        loss = out.loss * scale / denominator
        if model.training and out.distill is not None:
            self._step_sums += torch.tensor(
                [float(out.distill), float(out.num_tokens)], dtype=torch.float64
            )
        return (loss, outputs) if return_outputs else loss

    def _use_fused(self, model: nn.Module, loss_fn: DistillationLoss, return_outputs: bool) -> bool:
        """The fused path (loss from the last hidden states and the output layer; the full
        logits are never formed) when training a plain transformers model whose output layer is
        a plain linear map, unsharded; ``fused=False`` turns it off, and evaluation that wants
        the outputs (logits) takes the logits path."""
        from transformers import PreTrainedModel

        if self._fused is False or return_outputs:
            return False
        unwrapped = self.accelerator.unwrap_model(model)
        why = (
            "the loss runs with implementation='eager'"
            if loss_fn.implementation == "eager"
            else "the model is sharded (FSDP or DeepSpeed)"
            if self.is_fsdp_enabled or self.is_deepspeed_enabled
            # a PEFT wrapper's base_model is not the backbone the hidden-state hook expects
            else f"{type(unwrapped).__name__} is not a transformers PreTrainedModel"
            if not isinstance(unwrapped, PreTrainedModel)
            else "its output layer is not a plain linear map"
            if not M.has_plain_linear_head(unwrapped)
            else None
        )
        if why is not None and self._fused:
            raise ValueError(f"TAIDTrainer(fused=True): {why}; pass fused=None or False")
        return why is None

    def _teacher_rows(
        self,
        loss_fn: DistillationLoss,
        inputs: dict[str, Any],
        device: torch.device,
        *,
        fused: bool,
    ) -> S.TeacherSource | None:
        """The teacher's rows for this batch (its hidden states and output layer on the fused
        path when its head is a plain linear map, else its logits); None for a loss without
        a teacher."""
        if loss_fn.divergence is None:
            return None
        if self.teacher is None:
            raise ValueError("this loss needs teacher_model")
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        fused = fused and M.has_plain_linear_head(self.teacher)
        with torch.no_grad():
            return S.from_model(self.teacher, inputs, fused=fused)

    # -- schedule ----------------------------------------------------------------------------
    def _end_optimizer_step(self) -> None:
        sums = self._step_sums.to(self.accelerator.device)
        sums = self.accelerator.reduce(sums, reduction="sum")
        self._step_sums.zero_()
        if sums[1] > 0 and self.loss_fn is not None:
            self._last_distill = float(sums[0] / sums[1])
            self._last_schedule = self.loss_fn.advance(self._last_distill)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.loss_fn is not None and "loss" in logs:
            if self._last_distill is not None:
                logs["distill"] = self._last_distill
            logs.update(self._last_schedule)  # the same keys as taid's own loop
        super().log(logs, start_time)

    # -- checkpoints -------------------------------------------------------------------------
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        sched = getattr(self.loss_fn, "scheduler", None)
        if sched is None or not self.args.should_save:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(sched.state_dict(), f)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            return
        with open(path) as f:
            self._pending_state = json.load(f)  # applied in on_train_begin


class TAIDTrainer(TAIDTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that distils ``teacher_model`` into ``model``.

    Args:
        teacher_model: the teacher (a causal LM with the student's tokenizer).
        loss: a registry name (any key of :data:`taid.LOSSES`: ``taid``, the baselines,
            ``sft``) or a built :class:`~taid.losses.DistillationLoss`.
        loss_kwargs: keyword arguments of the loss (``t_start``, ``alpha``, ``distill_weight``,
            ...). For ``taid``, ``total_steps`` defaults to the Trainer's number of optimizer
            steps.
        fused: in training, compute the loss from the student's last hidden states and output
            layer, a chunk of target tokens at a time, so that the ``[B, T, V]`` logits are
            never formed (faster and leaner; the same loss within float32 rounding). None
            (default): whenever the model is a transformers model with a plain linear output
            layer and is not sharded (FSDP, DeepSpeed); True: the same, and an error saying
            why when it cannot; False: always from the logits.
        *args, **kwargs: passed to ``transformers.Trainer``.
    """
