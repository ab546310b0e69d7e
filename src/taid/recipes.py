"""Named recipes: the loss and student-data settings of the paper's on-policy baselines, as the
TAID reference scripts ran them (``scripts/*/gkd.sh``, ``scripts/*/distillm.sh``).

A config names one with ``recipe: gkd`` (or ``recipe=gkd`` on the command line); it replaces the
``loss`` and ``student_data`` sections, and any other override still applies on top. Each entry
is a list of dotted overrides, so it reads like a command line.
"""

from __future__ import annotations

RECIPES: dict[str, list[str]] = {
    # GKD (Agarwal et al., 2024): generalized JSD with beta 0.1 on a mix of dataset responses
    # and the student's own, half of the batches each (the reference's js_beta and mixed_alpha).
    "gkd": ["loss.name=jsd", "loss.beta=0.1", "student_data.fraction=0.5"],
    # DistiLLM (Ko et al., 2024): skew KL with alpha 0.1 and the adaptive use of student data:
    # starting from none, +0.1 of the batches whenever the held-out loss stops improving, with
    # a replay buffer of 1000 generations whose share grows over the run.
    "distillm": [
        "loss.name=skl",
        "loss.alpha=0.1",
        "student_data.fraction=0.0",
        "student_data.adaptive=true",
        "student_data.adaptive_step=0.1",
        "student_data.replay_size=1000",
        "student_data.replay_ratio=1.0",
    ],
}
"""Recipe name -> overrides of the ``loss`` and ``student_data`` sections."""

SECTIONS = ("loss", "student_data")
"""The config sections a recipe replaces."""
