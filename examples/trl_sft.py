"""TAID with TRL's SFTTrainer: keep TRL's data handling (chat templates, tokenization, padding)
and replace its loss with TAID through TAIDTrainerMixin.

Runs offline on the shipped chat data with the built-in teacher's tokenizer and tiny random
models; with real models load both with AutoModelForCausalLM.from_pretrained.

    python examples/trl_sft.py [--steps 6]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from taid.integrations.transformers import TAIDTrainerMixin
from taid.models import load_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data" / "quickstart.jsonl"


class TAIDSFTTrainer(TAIDTrainerMixin, SFTTrainer):
    """TRL's SFTTrainer with TAID (or any registered loss) as the objective."""


def tiny(hidden: int, layers: int, vocab: int) -> LlamaForCausalLM:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
        )
    )


def main(steps: int = 6, output_dir: str = "runs/trl_sft") -> TAIDSFTTrainer:
    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2-135m-instruct")  # real chat template, shipped offline
    teacher = tiny(64, 2, len(tokenizer))  # in real use: a pretrained, larger model
    student = tiny(32, 1, len(tokenizer))
    dataset = datasets.load_dataset("json", data_files=str(DATA), split="train").select(range(64))
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        max_length=128,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = TAIDSFTTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        loss="taid",
        loss_kwargs={"t_start": 0.4},
    )
    trainer.train()
    print(f"t after {steps} optimizer steps: {trainer.loss_fn.t:.3f}")
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--output-dir", default="runs/trl_sft")
    a = parser.parse_args()
    main(a.steps, a.output_dir)
