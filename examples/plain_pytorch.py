"""The shortest honest distillation loop with TAIDLoss: a teacher beside the student.

Both models are tiny Llama-style models built from configs, so this runs offline in seconds; the
teacher is first trained briefly on a synthetic "language" so there is something to distil.
Swap in ``AutoModelForCausalLM.from_pretrained(...)`` for real models; the loop stays the same.

    python examples/plain_pytorch.py [--steps 60]
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from taid import TAIDLoss
from taid import functional as TF

VOCAB, SEQ, BATCH = 64, 32, 16


def tiny_llama(hidden: int, layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(config)


def batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences that count up modulo a random stride: learnable, but not trivially."""
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=generator)
    stride = torch.randint(1, 4, (BATCH, 1), generator=generator)
    ids = (start + stride * torch.arange(SEQ)) % VOCAB
    labels = ids.roll(-1, dims=1)  # position i predicts token i + 1 ...
    labels[:, -1] = -100  # ... and the last position predicts nothing
    return ids, labels


def main(steps: int = 60) -> dict[str, float]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    # 1. A teacher that knows the data (in real use: a pretrained model).
    teacher = tiny_llama(hidden=128, layers=2)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _ in range(steps):
        ids, labels = batch(gen)
        loss = TF.cross_entropy(teacher(ids).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
    teacher.eval().requires_grad_(False)

    # 2. Distil it into a smaller student with TAID.
    student = tiny_llama(hidden=64, layers=1)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    loss_fn = TAIDLoss(t_start=0.4, total_steps=steps)
    eval_ids, eval_labels = batch(torch.Generator().manual_seed(1234))

    def held_out_kl() -> float:
        with torch.no_grad():
            return TF.forward_kl(
                student(eval_ids).logits, teacher(eval_ids).logits, eval_labels
            ).item()

    kl_before = held_out_kl()
    for step in range(steps):
        ids, labels = batch(gen)
        with torch.no_grad():
            teacher_logits = teacher(ids).logits
        out = loss_fn.compute(student(ids).logits, teacher_logits, labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss_fn.step(out.distill)  # once per optimizer step: advances t
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  taid {out.distill.item():.4f}  t {loss_fn.t:.3f}")
    kl_after = held_out_kl()
    print(f"held-out KL(teacher || student): {kl_before:.3f} -> {kl_after:.3f}")
    return {"kl_before": kl_before, "kl_after": kl_after, "t": loss_fn.t}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    main(parser.parse_args().steps)
