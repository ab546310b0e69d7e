"""TAID inside a transformers.Trainer run: swap Trainer for TAIDTrainer and pass a teacher.

Tiny Llama models built from configs and a synthetic dataset keep it offline and quick; with
real models use AutoModelForCausalLM.from_pretrained for both and your own dataset.

    python examples/hf_trainer.py [--steps 30] [--output-dir runs/hf_trainer]
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from taid.integrations.transformers import TAIDTrainer

VOCAB, SEQ = 64, 24


def tiny_llama(hidden: int, layers: int) -> LlamaForCausalLM:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=SEQ,
        )
    )


class CountingDataset(torch.utils.data.Dataset):
    """Sequences counting up modulo a stride; transformers-style labels (= input_ids)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def main(steps: int = 30, output_dir: str = "runs/hf_trainer") -> TAIDTrainer:
    torch.manual_seed(0)
    teacher = tiny_llama(hidden=96, layers=2)  # in real use: a pretrained, larger model
    student = tiny_llama(hidden=48, layers=1)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        logging_steps=5,
        save_steps=steps,
        report_to=[],
        seed=0,
        use_cpu=True,
    )
    trainer = TAIDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=CountingDataset(512, seed=0),
        eval_dataset=CountingDataset(32, seed=1),
        loss="taid",
        loss_kwargs={"t_start": 0.4},  # any registry name works: "fkl", "skl", ...
    )
    trainer.train()
    print(f"t after {steps} optimizer steps: {trainer.loss_fn.t:.3f}")
    print("held-out:", trainer.evaluate())
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output-dir", default="runs/hf_trainer")
    a = parser.parse_args()
    main(a.steps, a.output_dir)
