"""The code users copy must run: README blocks and the examples."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_python_blocks_run():
    loop, registry = python_blocks(ROOT / "README.md")
    ns: dict = {}
    exec(compile(loop, "README.md", "exec"), ns)
    # 20 optimizer steps, one step() each: t followed the floor to 0.4 + 0.6 * 19 / 20
    assert ns["loss_fn"].t == pytest.approx(0.4 + 0.6 * 19 / 20)
    assert ns["loss_fn"].scheduler.num_steps == 20
    ns = {}
    exec(compile(registry, "README.md", "exec"), ns)
    assert ns["loss_fn"].distill_weight == 0.9


def test_runnable_getting_started_blocks_run():
    """Blocks of docs/getting-started.md marked ``# runnable`` run as they are."""
    blocks = [
        b for b in python_blocks(ROOT / "docs" / "getting-started.md") if b.startswith("# runnable")
    ]
    assert blocks
    for block in blocks:
        ns: dict = {}
        exec(compile(block, "docs/getting-started.md", "exec"), ns)
        if "loss_fn" in ns and hasattr(ns["loss_fn"], "t"):
            assert ns["loss_fn"].scheduler.num_steps == ns["steps"]
            assert ns["loss_fn"].t == pytest.approx(0.4 + 0.6 * (ns["steps"] - 1) / ns["steps"])


def test_plain_pytorch_example_distils(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["plain_pytorch.py"])
    module = runpy.run_path(str(ROOT / "examples" / "plain_pytorch.py"))
    result = module["main"](steps=40)
    assert result["kl_after"] < 0.5 * result["kl_before"]
    assert result["t"] == pytest.approx(0.4 + 0.6 * 39 / 40)


def test_from_cache_example_distils_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["from_cache.py"])
    module = runpy.run_path(str(ROOT / "examples" / "from_cache.py"))
    result = module["main"](steps=20, workdir=str(tmp_path))
    assert (tmp_path / "cache" / "manifest.json").is_file()
    assert result["kl_after"] < 0.9 * result["kl_before"]
    assert result["t"] == pytest.approx(0.4 + 0.6 * 19 / 20)


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every taid-train / taid-cache-teacher command in the README's and docs' shell blocks
    (continuation lines joined, comments dropped), as (program, arguments)."""
    import shlex

    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                for program, names in (
                    ("train", ("taid-train", "scripts/train.py")),
                    ("cache", ("taid-cache-teacher", "scripts/cache_teacher.py")),
                ):
                    at = next((i for i, w in enumerate(words) if w in names), None)
                    if at is not None:
                        found.append((program, words[at + 1 :]))
    return found


def test_every_documented_command_is_a_valid_config(monkeypatch, capsys):
    """Each command of the README and docs loads and validates its config and finds its data
    file (``--check``: nothing is trained). Commands on a placeholder config (X.yaml) are
    skipped."""
    from taid.cli import cache_main, train_main

    monkeypatch.chdir(ROOT)
    checked = 0
    for program, args in documented_commands():
        config = args[args.index("--config") + 1]
        if not (ROOT / config).is_file():
            continue
        main = train_main if program == "train" else cache_main
        with pytest.raises(SystemExit) as info:
            main([*args, "--check"])
        out = capsys.readouterr()
        assert info.value.code == 0, f"{program} {' '.join(args)}: {out.err}"
        assert "config OK" in out.out
        checked += 1
    assert checked >= 12
