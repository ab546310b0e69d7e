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
