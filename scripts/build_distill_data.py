"""Build data/distill.jsonl: single-turn chats for runs long enough for TAID's schedule to
matter (docs/results.md), answered by the built-in teacher (SmolLM2-135M-Instruct, Apache-2.0).

Provenance: every prompt is composed by this script from the task forms, subjects and
constraints below (written for this repository, Apache-2.0); every response is the greedy output
of SmolLM2-135M-Instruct. No third-party text is included. Runs hold out 200 examples with
``data.eval_size: 200`` and a fixed ``data.eval_seed``.

Resumable: answers are appended to ``$TAID_CACHE/data/<name>.partial`` (``~/.cache/taid``,
outside the work tree) a batch at a time; a rerun skips the prompts already answered and writes
``<out>`` when all are.

    python scripts/build_distill_data.py [--n 3400] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

FORMS = [
    "Explain {subject} in {length}.",
    "Give {count} practical tips about {subject}.",
    "What are the main advantages and drawbacks of {subject}? Answer in {length}.",
    "Describe {subject} to {audience}.",
    "Write a short {text} about {subject}.",
    "What is a common mistake people make with {subject}, and how can it be avoided?",
    "Summarize what someone should know about {subject}, {constraint}.",
    "Compare {subject} with {other}: how are they alike and how do they differ?",
    "Give a simple everyday example that illustrates {subject}.",
    "List {count} questions a beginner might ask about {subject}, with one-line answers.",
    "How would you teach {subject} to {audience}, {constraint}?",
    "Why does {subject} matter? Answer in {length}.",
    "Explain how {subject} relates to {other}, {constraint}.",
    "Tell {audience} one surprising fact about {subject}.",
    "Plan a one-hour lesson on {subject} for {audience}.",
    "Give a short checklist for {subject}, {constraint}.",
    "What would change in daily life without {subject}? Answer in {length}.",
    "Write a friendly message encouraging {audience} to learn about {subject}.",
]
SUBJECTS = [
    "photosynthesis",
    "compound interest",
    "a healthy sleep routine",
    "recycling plastic",
    "the water cycle",
    "learning a musical instrument",
    "time management",
    "volcanoes",
    "composting at home",
    "public speaking",
    "the solar system",
    "saving for retirement",
    "writing a cover letter",
    "how vaccines work",
    "renewable energy",
    "the history of maps",
    "baking bread",
    "first aid for small cuts",
    "budgeting a monthly income",
    "migrating birds",
    "how a bicycle gear works",
    "keeping houseplants alive",
    "the rules of chess",
    "reading a nutrition label",
    "training for a 10k run",
    "how rainbows form",
    "negotiating a salary",
    "basic car maintenance",
    "learning to code",
    "the moon's phases",
    "staying safe online",
    "growing tomatoes",
    "how batteries store energy",
    "meditation",
    "organizing a small event",
    "the importance of bees",
    "writing clear emails",
    "how tides work",
    "choosing a good password",
    "the basics of photography",
    "how clouds form",
    "learning a second language",
    "the basics of first aid",
    "how a refrigerator works",
    "planning a garden",
    "the history of the printing press",
    "how earthquakes happen",
    "writing a short story",
    "caring for a dog",
    "how the heart pumps blood",
    "making a weekly meal plan",
    "the basics of chemistry",
    "how airplanes fly",
    "reducing food waste",
    "the life cycle of a butterfly",
    "how email travels across the internet",
    "learning to juggle",
    "the basics of geometry",
    "how a library organizes books",
    "drinking enough water",
]
AUDIENCES = [
    "a ten-year-old",
    "a busy parent",
    "a retired teacher",
    "a new employee",
    "a high-school student",
    "someone who has never heard of it",
    "a curious tourist",
]
LENGTHS = ["two sentences", "one short paragraph", "three bullet points", "under fifty words"]
COUNTS = ["three", "four", "five"]
TEXTS = ["poem", "story", "dialogue", "product description", "news-style paragraph"]
CONSTRAINTS = [
    "without technical words",
    "using an analogy",
    "in a friendly tone",
    "with one concrete example",
    "step by step",
]


def prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct prompts: every form with every subject, its other slots drawn with a
    generator seeded by ``seed``, shuffled."""
    rng = random.Random(seed)
    fills = {
        "audience": AUDIENCES,
        "length": LENGTHS,
        "count": COUNTS,
        "text": TEXTS,
        "constraint": CONSTRAINTS,
    }
    out = set()
    for form, subject in itertools.product(FORMS, SUBJECTS):
        if "how {subject}" in form and subject.startswith("how "):
            continue  # "Explain how how tides work ..."
        slots = [k for k in fills if "{" + k + "}" in form]
        combos = list(itertools.product(*(fills[k] for k in slots)))
        rng.shuffle(combos)
        for values in combos[:10]:  # a few variants of each form and subject
            others = [s for s in SUBJECTS if s != subject]
            out.add(
                form.format(subject=subject, other=rng.choice(others), **dict(zip(slots, values)))
            )
    ordered = sorted(out)
    random.Random(seed).shuffle(ordered)
    if n > len(ordered):
        raise SystemExit(f"only {len(ordered)} distinct prompts; ask for fewer")
    return ordered[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3400)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "data" / "distill.jsonl")
    )
    args = parser.parse_args()
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    # the same teacher, decoding and chat template as the quickstart data
    from build_quickstart_data import answer, load_teacher

    questions = prompts(args.n, args.seed)
    out = Path(args.out)
    # progress lives beside the converted built-in teacher ($TAID_CACHE, ~/.cache/taid), outside
    # the work tree, so that a killed build resumes from it, even in a fresh checkout
    from taid.models import cache_dir

    partial = cache_dir() / "data" / (out.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, str] = {}
    if partial.is_file():
        for line in partial.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            done[row["q"]] = row["a"]
    todo = [q for q in questions if q not in done]
    print(f"{len(done)} answered, {len(todo)} to go", flush=True)
    teacher = load_teacher() if todo else None
    for start in range(0, len(todo), args.batch_size):  # saved after every batch
        chunk = todo[start : start + args.batch_size]
        answers = answer(chunk, args.max_new_tokens, args.batch_size, teacher)
        with partial.open("a") as f:
            for q, a in zip(chunk, answers):
                f.write(json.dumps({"q": q, "a": a}) + "\n")
                done[q] = a
    with out.open("w") as f:
        for q in questions:
            if done[q]:
                f.write(
                    json.dumps(
                        {
                            "messages": [
                                {"role": "user", "content": q},
                                {"role": "assistant", "content": done[q]},
                            ]
                        }
                    )
                    + "\n"
                )
    partial.unlink()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
