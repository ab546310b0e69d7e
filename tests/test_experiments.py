"""experiments/compare.py end to end on tiny random models (--quick): the table and the figures
are produced for every method and the capacity ladder; the numbers are not checked here. The
paired statistics are checked on made-up results."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compare():
    return runpy.run_path(str(ROOT / "experiments" / "compare.py"))


def planned_loss(method: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The loss keys and student-data keys a method's overrides set, a recipe's expanded."""
    from taid.recipes import RECIPES

    items = []
    for o in method:
        key, value = o.split("=", 1)
        items += RECIPES[value] if key == "recipe" else [o]
    loss: dict[str, Any] = {}
    student_data: dict[str, Any] = {}
    for o in items:
        key, value = o.split("=", 1)
        section, name = key.split(".", 1)
        {"loss": loss, "student_data": student_data}[section][name] = yaml.safe_load(value)
    return loss, student_data


def test_a_recipe_method_trains_the_recipes_loss(compare):
    """A recipe sets the loss section itself: the comparison must not clear it afterwards
    (it did: gkd trained the config's default loss, TAID, on student generations)."""
    from taid.config import load_config

    plan = compare["load_plan"](ROOT / "experiments" / "compare.yaml", False)
    for method in ("gkd", "distillm"):
        overrides = compare["loss_overrides"](plan["methods"][method])
        config = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
        loss, student_data = planned_loss(plan["methods"][method])
        assert config.loss.name == loss["name"] != "taid"
        assert {k: config.loss.params[k] for k in loss if k != "name"} == {
            k: v for k, v in loss.items() if k != "name"
        }
        assert all(getattr(config.student_data, k) == v for k, v in student_data.items())


@pytest.mark.slow
def test_quick_comparison_produces_the_report(compare, tmp_path, monkeypatch):
    plan = compare["load_plan"](ROOT / "experiments" / "compare.yaml", False)
    out = compare["main"](["--quick", "--out", str(tmp_path / "runs")])
    report = out["report"].read_text()
    assert out["missing"] == []
    for method in plan["methods"]:  # every method of the full plan ran in the quick one
        assert f"| {method} | 1 |" in report
        summary = out["runs"][method][0]
        assert summary["steps"] == 3 and 0 < summary["head_mass"] <= 1
        assert 0 <= summary["tail_mass"] and summary["head_mass"] + summary["tail_mass"] <= 1
        assert 0 <= summary["rougeL"] <= 100
        assert summary["teacher_nll"] > 0 and summary["answer_tokens"] > 0
        assert 0 < summary["step_s"] <= summary["wall_s"]
        assert summary["repeated_4grams"] is None or 0 <= summary["repeated_4grams"] < 1
        assert [p["step"] for p in summary["eval_curve"]] == [0, 2, 3]
        # the loss that trained is the method's, with its parameters (a recipe's included)
        loss, student_data = planned_loss(plan["methods"][method])
        assert {k: summary["loss"][k] for k in loss} == loss, method
        assert summary["student_data"] == (
            None if not student_data else {**summary["student_data"], **student_data}
        ), method
        # the result file, kept apart from the (ignored) run folder
        saved = tmp_path / "runs" / "results" / "main" / method / "seed0.json"
        assert json.loads(saved.read_text())["kl"] == summary["kl"]
    assert "| taid |" in report and "Capacity gap" in report and "Paired differences" in report
    # the machines line names each run's precision as a dtype, not accelerate's "no"
    machines = report.split("Machine(s): ", 1)[1].split("\n", 1)[0]
    assert re.search(r"\((float32|bf16|fp16)\)", machines) and "(no)" not in machines
    assert [row["teacher"] for row in out["capacity"]] == ["tiny-1l", "tiny-2l"]
    assert out["capacity"][0]["layers"] == 1 and out["capacity"][1]["layers"] == 2
    # each teacher's reference and students record the one copy of it they were made with
    for row in out["capacity"]:
        assert compare["teacher_copies"](row) == 1
    # every student is also judged by the base teacher: the same judge on every rung, which
    # on the base teacher's own rung is its teacher
    healed, base = (
        [s for runs in row["students"].values() for s in runs] for row in out["capacity"]
    )
    assert all(s["judge_nll"] > 0 for s in healed + base)
    assert all(s["judge_nll"] == s["teacher_nll"] for s in base)
    assert any(s["judge_nll"] != s["teacher_nll"] for s in healed)
    assert (
        out["capacity"][0]["teacher_weights_sha256"] != out["capacity"][1]["teacher_weights_sha256"]
    )
    for name in ("loss_and_t.png", "capacity.png", "curves.png"):
        assert (out["figures"] / name).stat().st_size > 1000
    # t rises on the TAID runs only, and is logged with every evaluation
    assert all("t" in h for h in out["runs"]["taid"][0]["history"])
    assert all("t" in p for p in out["runs"]["taid"][0]["eval_curve"])
    assert not any("t" in h for h in out["runs"]["fkl"][0]["history"])

    # a second call trains nothing: every run's result file exists; only the report's block
    # is rewritten
    from taid import trainer as TR

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(TR, "train", no_training)
    report_path = out["report"]
    report_path.write_text(
        "Intro kept.\n\n" + report_path.read_text().split("\n", 2)[2] + "\nOutro kept.\n"
    )
    compare["main"](["--quick", "--out", str(tmp_path / "runs")])
    text = report_path.read_text()
    assert text.startswith("Intro kept.") and text.rstrip().endswith("Outro kept.")

    # --report-only with a result removed: the run is reported missing, nothing is trained
    (tmp_path / "runs" / "results" / "main" / "akl" / "seed0.json").unlink()
    again = compare["main"](["--quick", "--out", str(tmp_path / "runs"), "--report-only"])
    assert again["missing"] == ["akl seed 0"]
    assert "| akl | 0 | not run yet |" in again["report"].read_text()


def _runs(values: dict[str, list[float]]) -> dict[str, list[dict]]:
    return {
        method: [
            {"seed": k, "kl": v, "ppl": 10 + v, "teacher_nll": v, "rougeL": 20 - v}
            for k, v in enumerate(seq)
        ]
        for method, seq in values.items()
    }


def test_paired_differences_and_their_reading(compare):
    paired, verdict = compare["paired"], compare["verdict"]
    runs = _runs({"taid": [1.0, 1.1, 0.9], "fkl": [1.5, 1.6, 1.3], "skl": [1.2, 0.9, 1.0]})
    lower_kl = paired(runs, "taid", "fkl")
    assert lower_kl["seeds"] == 3
    kl = lower_kl["kl"]
    assert kl["mean"] == pytest.approx(-(0.5 + 0.5 + 0.4) / 3)
    assert (kl["treatment"], kl["baseline"]) == (3, 0)
    assert verdict(kl, lower=True) == "TAID better"
    # ROUGE-L: higher is better, so the same seeds favour TAID there too
    rouge = lower_kl["rougeL"]
    assert rouge["mean"] > 0 and rouge["treatment"] == 3
    assert verdict(rouge, lower=False) == "TAID better"
    # differences of both signs, smaller than their spread: no difference
    mixed = paired(runs, "taid", "skl")["kl"]
    assert (mixed["treatment"], mixed["baseline"]) == (2, 1)
    assert verdict(mixed, lower=True) == "no difference"
    # worse on every seed
    worse = paired(_runs({"taid": [2.0, 2.1], "fkl": [1.0, 1.0]}), "taid", "fkl")["kl"]
    assert verdict(worse, lower=True) == "TAID worse"
    # only the seeds both have are paired; one seed gives no reading
    one = paired(_runs({"taid": [1.0], "fkl": [1.5, 1.6]}), "taid", "fkl")
    assert one["seeds"] == 1 and verdict(one["kl"], lower=True) == "one seed"
    cell = compare["paired_cell"]
    assert cell(one["kl"], True, 4) == "-0.5000, one seed"  # no spread or count to read
    assert cell(kl, True, 2) == "-0.47 ± 0.06, 3:0, TAID better"
    assert cell(None, True, 2) == "n/a"
    # a seed whose two runs trained in different precisions is not paired, and is counted
    runs = _runs({"taid": [1.0, 1.1], "fkl": [1.5, 1.6]})
    runs["fkl"][1]["precision"] = "bf16"
    split = paired(runs, "taid", "fkl")
    assert (split["seeds"], split["precision_differs"], split["kl"]["n"]) == (1, 1, 1)


def test_methods_train_in_the_order_given(compare):
    sel = compare["Selection"](methods=["taid", "fkl"])
    assert sel.order(["sft", "fkl", "rkl", "taid"]) == ["taid", "fkl", "sft", "rkl"]
    assert sel.trains("fkl", 0) and not sel.trains("sft", 0)
    assert compare["Selection"]().order(["sft", "fkl"]) == ["sft", "fkl"]


def test_a_sitting_can_choose_the_ladders_teachers(compare, tmp_path):
    sel = compare["Selection"](seeds={1}, teachers={"t10", "t30"})
    assert sel.trains("fkl", 1, "t10") and not sel.trains("fkl", 1, "t20")
    assert sel.trains("fkl", 1)  # the main comparison's runs are not the ladder's
    assert not sel.trains("fkl", 0, "t10")
    assert sel.prepares("t30") and not sel.prepares("t20")
    everything = compare["Selection"]()
    assert everything.prepares("t20") and everything.trains("akl", 2, "t20")
    assert not compare["Selection"](report_only=True).prepares("t10")
    with pytest.raises(SystemExit, match="--teachers: unknown \\['t99'\\]; the capacity ladder"):
        compare["main"](["--quick", "--out", str(tmp_path), "--teachers", "t99", "--report-only"])


def test_learning_curve_differences_pair_runs_by_seed_and_step(compare):
    differences = compare["curve_differences"]

    def run(seed, kls, steps=(0, 50, 100), precision="no"):
        curve = [{"step": s, "kl": k} for s, k in zip(steps, kls)]
        return {"seed": seed, "precision": precision, "eval_curve": curve}

    runs = {
        "taid": [run(0, [9.0, 3.0, 2.0]), run(1, [9.0, 4.0, 1.0]), run(2, [9.0, 1.0, 1.0])],
        # seed 2 has no run of the baseline; seed 1 evaluated at step 50 only
        "fkl": [run(0, [9.0, 2.5, 2.5]), run(1, [4.5], steps=(50,))],
    }
    got = differences(runs, "taid", "fkl")
    assert [(step, n) for step, _, _, n in got] == [(0, 1), (50, 2), (100, 1)]
    assert got[0][1:3] == (0.0, 0.0)
    assert got[1][1] == pytest.approx(0.0) and got[1][2] == pytest.approx(2**0.5 / 2)
    assert got[2][1:3] == (pytest.approx(-0.5), 0.0)
    # a seed whose runs trained in different precisions is left out
    runs["fkl"][1]["precision"] = "bf16"
    assert [(step, n) for step, _, _, n in differences(runs, "taid", "fkl")] == [
        (0, 1),
        (50, 1),
        (100, 1),
    ]


def test_step_time_is_the_median_logged_step_times_the_steps(compare):
    step_seconds = compare["step_seconds"]
    # logged every second step, an evaluation row between, one step slowed by another job
    history = [
        {"step": 2, "step_s": 1.0},
        {"step": 2, "eval/kl": 3.0},
        {"step": 4, "step_s": 2.0},
        {"step": 6, "step_s": 9.0},
    ]
    assert step_seconds(history, 10) == pytest.approx(20.0)
    assert step_seconds([{"step": 0, "eval/kl": 3.0}], 0) is None


def test_repeated_ngrams_count_what_an_answer_already_said(compare):
    repeated = compare["repeated_ngrams"]
    assert repeated([[1, 2, 3, 4, 5, 6]], 4) == 0.0
    # a loop of three tokens: of its 7 4-grams, 3 distinct
    assert repeated([[1, 2, 3] * 3 + [1]], 4) == pytest.approx(1 - 3 / 7)
    # answers shorter than n are left out; none long enough gives None
    assert repeated([[1, 2], [1, 2, 3, 4, 5, 6]], 4) == 0.0
    assert repeated([[1, 2, 3]], 4) is None


def test_the_report_names_the_main_runs_still_to_run_and_counts_the_ladders(compare):
    still = compare["still_to_run"]
    missing = ["fkl seed 1", "capacity t10: fkl seed 0", "capacity t10: the teacher"]
    assert still(missing) == "fkl seed 1, the capacity ladder's 2 runs"
    assert still(["fkl seed 1"]) == "fkl seed 1"


def test_the_capacity_table_says_when_a_teacher_was_healed_twice(compare):
    def student(digest):
        return {"kl": 1.0, "teacher_nll": 1.0, "teacher_weights_sha256": digest}

    row = {
        "teacher": "t10",
        "params": 1e6,
        "layers": 10,
        "rougeL": 50.0,
        "teacher_weights_sha256": "a",
        "students": {"fkl": [student("a"), student("a")]},
    }
    assert compare["teacher_copies"](row) == 1
    assert "copies" not in "\n".join(compare["capacity_section"]([row], "fig"))
    row["students"]["taid"] = [student("b"), student(None)]  # None: not recorded
    assert compare["teacher_copies"](row) == 2
    assert "t10: its students and reference come from 2 copies" in "\n".join(
        compare["capacity_section"]([row], "fig")
    )


class _Stop(Exception):
    """Stands for a run killed part-way (a session ending, a machine taken back)."""


def test_a_stopped_run_resumes_where_it_was_and_a_changed_one_starts_over(
    compare, tmp_path, monkeypatch, capsys
):
    from taid import trainer as TR

    plan = compare["load_plan"](ROOT / "experiments" / "compare.yaml", True)
    names = compare["run_one"].__globals__  # the functions' own namespace
    real_step = TR._optimizer_step
    calls: list[int] = []
    stop_at: list[int | None] = [None]

    def optimizer_step(s, micro, cached, step):
        calls.append(step)
        if step == stop_at[0]:
            raise _Stop
        return real_step(s, micro, cached, step)

    monkeypatch.setattr(TR, "_optimizer_step", optimizer_step)

    def run(out, loss, stop=None):
        calls.clear()
        stop_at[0] = stop
        overrides = ["seed=0", "train.save_every=1", *compare["loss_overrides"]([loss])]
        return compare["run_one"](plan, out, overrides, out.parent / f"{out.name}.json")

    def check(summary):  # one row per step and per evaluation: nothing counted twice
        assert [h["step"] for h in summary["history"]] == [1, 2, 3]
        assert [p["step"] for p in summary["eval_curve"]] == [0, 2, 3]

    # stopped during step 3 (checkpoints at steps 1 and 2): the same run resumes at step 3
    with pytest.raises(_Stop):
        run(tmp_path / "a", "loss.name=fkl", stop=2)
    resumed = run(tmp_path / "a", "loss.name=fkl")
    check(resumed)
    assert calls == [2] and resumed["resumed_at"] == 2
    assert "resumed from" in capsys.readouterr().out
    assert "1 resumed run: the part after the checkpoint only" in compare["resumed_note"](
        [resumed, {"resumed_at": None}]
    )

    # the same folder with another loss: its checkpoints belong to another run; start over
    with pytest.raises(_Stop):
        run(tmp_path / "b", "loss.name=fkl", stop=2)
    capsys.readouterr()
    measure = names["generation_metrics"]

    def stopped_measurement(*args, **kwargs):
        raise _Stop

    monkeypatch.setitem(names, "generation_metrics", stopped_measurement)
    with pytest.raises(_Stop):  # trained all three steps, stopped while being measured
        run(tmp_path / "b", "loss.name=rkl")
    assert calls == [0, 1, 2]
    assert "starting over" in capsys.readouterr().out
    assert not (tmp_path / "b.json").exists()
    # measured again from its last checkpoint, not trained again
    monkeypatch.setitem(names, "generation_metrics", measure)
    summary = run(tmp_path / "b", "loss.name=rkl")
    assert calls == []
    check(summary)
    assert json.loads((tmp_path / "b.json").read_text())["kl"] == summary["kl"]


def test_the_capacity_table_of_teachers_without_students_is_whole_and_has_no_figure(compare):
    """Teachers healed, no student finished: every row has as many cells as the header, the
    teachers' perplexities come from their own measurements, and no figure is linked."""
    healed = {"teacher": "t10", "params": 6e7, "layers": 10, "rougeL": 22.2, "students": {}}
    base = {"teacher": "t30", "params": 1.3e8, "layers": 30, "rougeL": 100.0, "students": {}}
    healed["teacher_ppl"] = compare["capacity_teacher_ppl"](healed, {"ppl": 9.98}, 2.25)
    base["teacher_ppl"] = compare["capacity_teacher_ppl"](base, None, 2.25)
    lines = compare["capacity_section"]([healed, base], "fig")
    table = [line for line in lines if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1, table
    assert "| t10 | 60.0 M | 10 | 9.98 | 22.2 |" in table
    assert "| t30 | 130.0 M | 30 | 2.25 | 100.0 |" in table
    assert not any("capacity.png" in line for line in lines)
    assert "No student run of the ladder has finished yet." in lines


def test_a_capacity_teacher_ppl_is_its_students_measurement_once_one_has_finished(compare):
    row = {"students": {"fkl": [{"teacher_ppl": 10.1}], "taid": [{"teacher_ppl": 10.1}]}}
    assert compare["capacity_teacher_ppl"](row, {"ppl": 9.98}, 2.25) == 10.1
    assert compare["capacity_teacher_ppl"]({"students": {}}, None, None) is None
    lines = compare["capacity_section"](
        [
            {
                "teacher": "t10",
                "params": 6e7,
                "layers": 10,
                "rougeL": 22.2,
                "teacher_ppl": 10.1,
                "students": {
                    "fkl": [{"ppl": 12.5, "judge_nll": 0.8, "repeated_4grams": 0.25, "kl": 1.5}]
                },
            },
            {"teacher": "t20", "params": 9e7, "layers": 20, "rougeL": 40.0, "students": {}},
        ],
        "fig",
    )
    table = [line for line in lines if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1, table
    assert "| t10 | 60.0 M | 10 | 10.10 | 22.2 | 12.50 / 0.800 / 0.25 |" in table
    assert "| t20 | 90.0 M | 20 | n/a | 40.0 | n/a / n/a / n/a |" in table
    assert "![capacity gap](fig/capacity.png)" in lines


def test_the_ladder_reads_each_methods_gain_from_the_stronger_teacher(compare):
    """Per seed, the student's measure with a stronger teacher minus with a weaker one, for
    each step up the ladder and from its weakest to its strongest teacher (ordered by the
    teachers' perplexity, not by the order of the rows), read as the paired table is."""

    def students(ppls, nll=0.9):
        return [{"seed": k, "ppl": p, "judge_nll": nll} for k, p in enumerate(ppls)]

    def rung(name, ppl, runs):
        return {
            "teacher": name,
            "params": 1e8,
            "layers": 10,
            "rougeL": 30.0,
            "teacher_ppl": ppl,
            "students": runs,
        }

    ladder = [
        rung("t20", 4.0, {"fkl": students([29, 30, 28.5])}),
        rung(
            "t30",
            2.25,
            {
                "fkl": students([28.5, 29.5, 28]),
                "skl": students([140, 150]),
                "taid": students([30, 29, 31], nll=0.8),
            },
        ),
        rung(
            "t10",
            10.0,
            {
                "fkl": students([30, 31, 29]),
                "skl": students([50, 52]),
                "taid": students([29, 30, 30], nll=0.95),
                "akl": students([33]),
            },
        ),
    ]
    lines = compare["capacity_gain_section"](ladder)
    assert lines[0].startswith("Gain from a stronger teacher: per seed")
    rows = [line for line in lines if line.startswith("| t")]
    same = "+0.000 ± 0.000, 0:0, no difference |"
    # each step up (only fkl has a student with t20), then the ends (akl: none with t30)
    assert rows == [
        "| teachers | method | seeds | perplexity | base teacher's NLL |",
        f"| t10 → t20 | fkl | 3 | -0.83 ± 0.29, 3:0, gains | {same}",
        f"| t20 → t30 | fkl | 3 | -0.50 ± 0.00, 3:0, gains | {same}",
        f"| t10 → t30 | fkl | 3 | -1.33 ± 0.29, 3:0, gains | {same}",
        f"| t10 → t30 | skl | 2 | +94.00 ± 5.66, 0:2, loses | {same}",
        "| t10 → t30 | taid | 3 | +0.33 ± 1.15, 1:2, no difference | -0.150 ± 0.000, 3:0, gains |",
    ]
    # two teachers: their one step, not repeated as the ends
    two = [line for line in compare["capacity_gain_section"](ladder[1:]) if "→" in line]
    assert [line.split(" | ")[:2] for line in two] == [
        ["| t10 → t30", m] for m in ("fkl", "skl", "taid")
    ]
    assert compare["capacity_gain_section"](ladder[:1]) == []  # one teacher: nothing to read
    assert compare["precision_note"](ladder) == []  # one precision (none recorded): no note
    for runs in ladder[1]["students"].values():
        for s in runs:
            s["precision"] = "bf16" if s["seed"] == 0 else "no"
    assert compare["precision_note"](ladder) == [
        "The ladder's students trained in different precisions (bf16: seed 0; float32: seeds "
        "1, 2; `auto` on different CPUs): a cell's spread includes the precision's effect; the "
        "gain table pairs the runs of one seed, which share theirs."
    ]
    # the whole section carries it after the table
    assert lines[0] in compare["capacity_section"](ladder, "fig")

    # TAID against each baseline with the same teacher, paired by seed
    paired = compare["capacity_paired_section"](ladder, ["taid"])
    rows = [line for line in paired if line.startswith(("| t10 ", "| t30 "))]
    assert rows == [
        "| t30 | taid - fkl | 3 | +1.33 ± 1.76, 1:2, no difference | -0.100 ± 0.000, 3:0, "
        "TAID better |",
        "| t30 | taid - skl | 2 | -115.50 ± 7.78, 2:0, TAID better | -0.100 ± 0.000, 2:0, "
        "TAID better |",
        "| t10 | taid - akl | 1 | -4.00, one seed | +0.050, one seed |",
        "| t10 | taid - fkl | 3 | -0.33 ± 1.15, 2:1, no difference | +0.050 ± 0.000, 0:3, "
        "TAID worse |",
        "| t10 | taid - skl | 2 | -21.50 ± 0.71, 2:0, TAID better | +0.050 ± 0.000, 0:2, "
        "TAID worse |",
    ]
    assert compare["capacity_paired_section"](ladder, ["gkd"]) == []  # no such run: no table


def test_a_teacher_healed_twice_shows_each_copys_perplexity(compare):
    row = {
        "teacher": "t20",
        "params": 9e7,
        "layers": 20,
        "rougeL": 27.8,
        "students": {
            "fkl": [
                {"teacher_ppl": 4.02, "teacher_weights_sha256": "a", "ppl": 28.7},
                {"teacher_ppl": 4.10, "teacher_weights_sha256": "b", "ppl": 28.9},
            ],
            "taid": [{"teacher_ppl": 4.02, "teacher_weights_sha256": "a", "ppl": 29.8}],
        },
    }
    row["teacher_ppl"] = compare["capacity_teacher_ppl"](row, {"ppl": 4.0}, 2.25)
    assert row["teacher_ppl"] == pytest.approx(4.06)  # the mean over the two copies
    table = [line for line in compare["capacity_section"]([row], "fig") if line.startswith("|")]
    assert table[-1].startswith("| t20 | 90.0 M | 20 | 4.02 / 4.10 | 27.8 |")
