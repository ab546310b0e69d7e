"""Distil from a teacher cache in your own loop: the teacher runs once, then only its stored
outputs are read.

The config is configs/smoke.yaml (a tiny random teacher and student built from configs, the
shipped chat data), so this runs offline in seconds. With your own config the two commands
are ``taid-cache-teacher --config X.yaml`` and ``taid-train --config X.yaml
teacher.source=cache``; this file shows the same thing inside a hand-written loop.

    python examples/from_cache.py [--steps 30] [--mode topk|hidden|full]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from taid import TAIDLoss
from taid import functional as TF
from taid.cache import TeacherCache, identity, write_cache
from taid.config import load_config
from taid.data import BatchStream, eval_batches, load_examples, split_eval
from taid.models import load_model, run_tokenizer

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def main(steps: int = 30, mode: str = "topk", workdir: str | None = None) -> dict[str, float]:
    workdir = workdir or tempfile.mkdtemp(prefix="taid-cache-")
    config = load_config(
        SMOKE,
        [
            f"teacher.cache_dir={Path(workdir) / 'cache'}",
            f"cache.mode={mode}",
            "log.progress=false",
        ],
    )

    # 1. The teacher runs once over the config's data (resumable; `accelerate launch` splits
    #    the shards over processes). Nothing below loads the teacher.
    write_cache(config)
    cache = TeacherCache(config.teacher.cache_dir)

    # 2. The examples, numbered as in the cache; the cache refuses other data or tokenizers.
    tokenizer = run_tokenizer(config)
    examples, _ = load_examples(config.data, tokenizer)
    cache.check(identity(config, tokenizer, examples, len(tokenizer)))
    train, held_out = split_eval(examples, 8, seed=0)

    torch.manual_seed(0)
    student = load_model(config.student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    loss_fn = TAIDLoss(t_start=0.4, total_steps=steps)
    pad = tokenizer.pad_token_id

    def held_out_kl() -> float:
        """KL(cached teacher || student) per target token on the held-out examples."""
        total, tokens = 0.0, 0
        with torch.no_grad():
            for batch in eval_batches(held_out, 4, pad, packed=False):
                teacher = cache.source(batch["example_ids"], batch["labels"])
                logits = student(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                out = TF.loss_terms("fkl", logits, teacher, batch["labels"], reduction="sum")
                total, tokens = total + out.loss.item(), tokens + int(out.num_tokens)
        return total / tokens

    # 3. The loop: each batch carries its examples' numbers; the cache turns them into the
    #    teacher (one row per target token, read from disk) for any loss of the registry.
    kl_before = held_out_kl()
    batches = iter(BatchStream(train, 4, seed=0, pad_id=pad, packed=False))
    for step in range(steps):
        batch = next(batches)
        teacher = cache.source(batch["example_ids"], batch["labels"])
        logits = student(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        out = loss_fn.compute(logits, teacher, batch["labels"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss_fn.step(out.distill)
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  taid {out.distill.item():.5f}  t {loss_fn.t:.3f}")
    kl_after = held_out_kl()
    print(
        f"cache: {cache.mode}, {cache.bytes_per_token():.0f} bytes per target token; "
        f"held-out KL(teacher || student): {kl_before:.5f} -> {kl_after:.5f}"
    )
    return {"kl_before": kl_before, "kl_after": kl_after, "t": loss_fn.t}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--mode", choices=["topk", "hidden", "full"], default="topk")
    args = parser.parse_args()
    main(args.steps, args.mode)
