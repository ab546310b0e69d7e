"""The end-of-run summary: held-out metrics before and after, and greedy samples."""

from __future__ import annotations

from typing import Any


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}" if abs(x) < 1000 else f"{x:.1f}"


def report_lines(result: dict[str, Any]) -> list[str]:
    """Markdown lines: a before/after table on the held-out split, then the samples."""
    before, after = result.get("before") or {}, result.get("after") or {}
    lines = [f"steps: {result['steps']}; final student: {result['final_dir']}", ""]
    if after:
        lines += ["| held-out | KL(teacher \\|\\| model) | perplexity |", "|---|---|---|"]
        if "eval/teacher_ppl" in after:
            lines.append(f"| teacher | 0 | {_fmt(after['eval/teacher_ppl'])} |")
        if before:
            lines.append(
                f"| student before | {_fmt(before.get('eval/kl_teacher_student'))} | "
                f"{_fmt(before.get('eval/student_ppl'))} |"
            )
        lines.append(
            f"| student after | {_fmt(after.get('eval/kl_teacher_student'))} | "
            f"{_fmt(after.get('eval/student_ppl'))} |"
        )
    for sample in result.get("samples", []):
        lines += ["", f"prompt: {sample['prompt']!r}"]
        for who in ("teacher", "student_before", "student_after"):
            if who in sample:
                lines.append(f"  {who:>14}: {sample[who]!r}")
    return lines


def print_report(result: dict[str, Any]) -> None:
    print("\n".join(report_lines(result)))
