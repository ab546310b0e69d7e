"""Student-generated responses: on-policy distillation inside the training loop.

With ``student_data.fraction = lambda`` a micro-batch is, with probability ``lambda``, replaced
by the student's own responses to the batch's prompts (GKD's mix of fixed and on-policy data);
with ``adaptive`` the probability rises whenever the held-out loss stops improving (DistiLLM's
schedule); with a replay buffer, some of those batches reuse earlier generations. Only the
generated tokens are targets, and the teacher scores them online like any batch, so every
registered loss (TAID included) trains on them unchanged.

Everything is reproducible and resumable: whether a micro-batch is generated or replayed, and
which buffer entries are replayed, is drawn from a generator seeded by (seed, step,
micro-batch), identical on every process (so under FSDP all of them generate together); the
sampling itself uses torch's generator, saved per process in checkpoints; the schedule and the
buffer are plain values saved by :meth:`StudentData.state_dict` and
:meth:`StudentData.rank_state_dict`.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor

from taid import data as D
from taid.config import StudentDataConfig


def prompts_of(batch: dict[str, Tensor]) -> list[list[int]]:
    """Each row's prompt: its tokens up to and including the position that predicts the first
    target (``labels`` are aligned: position ``i`` predicts token ``i + 1``)."""
    out = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        first = next((i for i, lab in enumerate(labels) if lab != D.IGNORE_INDEX), None)
        if first is None:
            raise ValueError("a batch row has no target token, so no prompt ends anywhere")
        out.append(ids[: first + 1])
    return out


@torch.no_grad()
def generate(
    model: Any,
    prompts: list[list[int]],
    cfg: StudentDataConfig,
    *,
    pad_id: int,
    eos_ids: list[int],
    max_length: int,
    synced: bool = False,
) -> list[D.Example]:
    """The student's responses to ``prompts``, batched (left padding), as examples whose
    targets are the generated tokens (up to and including the first end-of-sequence token), cut
    to ``max_length`` tokens. ``synced`` keeps every process stepping until all are done (FSDP
    shards the weights, so every forward is collective)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    sampling: dict[str, Any] = {"do_sample": cfg.temperature > 0}
    if cfg.temperature > 0:
        sampling.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        synced_gpus=synced,
        **sampling,
    )
    model.train(was_training)
    examples = []
    for prompt, row in zip(prompts, out[:, width:].tolist()):
        end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        response = row[:end][: max(max_length - len(prompt), 1)]
        examples.append(D.Example(prompt + response, [0] * len(prompt) + [1] * len(response)))
    return examples


class StudentData:
    """The student-data decisions, generation, replay buffer and adaptive schedule of a run."""

    def __init__(
        self,
        cfg: StudentDataConfig,
        *,
        seed: int,
        total_steps: int,
        pad_id: int,
        eos_ids: list[int],
        max_length: int,
    ) -> None:
        self.cfg = cfg
        self.seed = seed
        self.total_steps = total_steps
        self.pad_id = pad_id
        self.eos_ids = eos_ids
        self.max_length = max_length
        self.fraction = cfg.fraction
        self.last_eval: float | None = None
        self.buffer: list[D.Example] = []  # this process's generations, newest last

    def _rng(self, step: int, micro: int) -> random.Random:
        return random.Random(f"taid-student-data:{self.seed}:{step}:{micro}")

    def batch(
        self, model: Any, batch: dict[str, Tensor], step: int, micro: int, *, synced: bool
    ) -> tuple[dict[str, Tensor], str]:
        """The micro-batch to train on: ``batch`` itself (``"dataset"``), or responses the
        student generates now (``"generated"``) or generated earlier (``"replayed"``)."""
        rng = self._rng(step, micro)
        if rng.random() >= self.fraction:
            return batch, "dataset"
        n = batch["input_ids"].shape[0]
        replay_share = self.cfg.replay_ratio * step / self.total_steps
        if len(self.buffer) >= n and rng.random() < replay_share:
            examples = [self.buffer[i] for i in rng.sample(range(len(self.buffer)), n)]
            kind = "replayed"
        else:
            examples = generate(
                model,
                prompts_of(batch),
                self.cfg,
                pad_id=self.pad_id,
                eos_ids=self.eos_ids,
                max_length=self.max_length,
                synced=synced,
            )
            if self.cfg.replay_size:
                self.buffer = (self.buffer + examples)[-self.cfg.replay_size :]
            kind = "generated"
        device = batch["input_ids"].device
        new = D.collate(examples, self.pad_id, packed=False)
        return {k: v.to(device) for k, v in new.items()}, kind

    def after_eval(self, loss: float) -> None:
        """The adaptive schedule: one step up whenever the held-out loss did not improve on
        the previous evaluation."""
        if self.cfg.adaptive and self.last_eval is not None and loss >= self.last_eval:
            self.fraction = min(1.0, self.fraction + self.cfg.adaptive_step)
        self.last_eval = loss

    # -- state (plain values: checkpoints store them as JSON) ---------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What every process shares: the schedule."""
        return {"fraction": self.fraction, "last_eval": self.last_eval}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fraction = float(state["fraction"])
        self.last_eval = None if state["last_eval"] is None else float(state["last_eval"])

    def rank_state_dict(self) -> dict[str, Any]:
        """What this process alone holds: its replay buffer."""
        return {"buffer": [[ex.input_ids, ex.targets] for ex in self.buffer]}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = [D.Example(list(ids), list(targets)) for ids, targets in state["buffer"]]
