"""experiments/compare.py end to end on tiny random models (--quick): the table and the figures
are produced for every method and the capacity sweep; the numbers are not checked here."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_comparison_produces_the_report(tmp_path):
    compare = runpy.run_path(str(ROOT / "experiments" / "compare.py"))
    plan = compare["load_plan"](ROOT / "experiments" / "compare.yaml", False)
    out = compare["main"](["--quick", "--out", str(tmp_path / "runs")])
    report = out["report"].read_text()
    for method in plan["methods"]:  # every method of the full plan ran in the quick one
        assert f"| {method} |" in report
        summary = out["runs"][method][0]
        assert summary["steps"] == 3 and 0 < summary["head_mass"] <= 1
        assert 0 <= summary["tail_mass"] and summary["head_mass"] + summary["tail_mass"] <= 1
        assert 0 <= summary["rougeL"] <= 100
    assert "| taid |" in report and "Capacity gap" in report
    assert [row["teacher"] for row in out["capacity"]] == ["tiny-1l", "tiny-2l"]
    assert out["capacity"][0]["layers"] == 1 and out["capacity"][1]["layers"] == 2
    for name in ("loss_and_t.png", "capacity.png"):
        assert (out["figures"] / name).stat().st_size > 1000
    # t rises on the TAID runs only, by the linear floor at least
    assert all("t" in h for h in out["runs"]["taid"][0]["history"])
    assert not any("t" in h for h in out["runs"]["fkl"][0]["history"])

    # a second call reuses the finished runs and rewrites only the report's block
    report_path = out["report"]
    report_path.write_text(
        "Intro kept.\n\n" + report_path.read_text().split("\n", 2)[2] + "\nOutro kept.\n"
    )
    compare["main"](["--quick", "--out", str(tmp_path / "runs")])
    text = report_path.read_text()
    assert text.startswith("Intro kept.") and text.rstrip().endswith("Outro kept.")
