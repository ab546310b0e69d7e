"""Loading models and tokenizers: the built-in teacher's tokenizer without its weights."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.slow
def test_the_builtin_tokenizer_loads_without_converting_the_model(tmp_path, monkeypatch):
    from taid import models as M
    from taid.cache import tokenizer_hash

    full = M.load_tokenizer(str(M.builtin_model_dir("smollm2-135m-instruct")))
    monkeypatch.setenv("TAID_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(M, "_convert_gguf", lambda *a, **k: calls.append(a))
    alone = M.load_tokenizer("smollm2-135m-instruct")
    assert not calls and not (tmp_path / "smollm2-135m-instruct").exists()
    assert (tmp_path / "smollm2-135m-instruct.tokenizer" / "tokenizer.json").is_file()
    assert tokenizer_hash(alone) == tokenizer_hash(full)
    assert alone.pad_token_id == full.pad_token_id and len(alone) == len(full) == 49152


@pytest.mark.slow
def test_the_wheel_installs_offline_with_torch_alone_and_the_loss_works(tmp_path):
    """pip install of the built wheel into a fresh venv that has torch and nothing else:
    `from taid import TAIDLoss` works on random logits, and taid-train names the extra."""
    import os
    import subprocess
    import sys
    import venv
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(root),
        ],
        check=True,
        timeout=600,
    )
    (wheel,) = dist.glob("taid-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, system_site_packages=False)
    python = env_dir / "bin" / "python"
    # torch from this interpreter's site-packages, nothing else: a .pth file points at a
    # directory holding only links to torch and its own runtime dependencies
    import importlib.util

    only = tmp_path / "only-torch"
    only.mkdir()
    site = Path(importlib.util.find_spec("torch").origin).parents[1]
    for name in (
        "torch",
        "torchgen",
        "typing_extensions.py",
        "sympy",
        "mpmath",
        "networkx",
        "jinja2",
        "markupsafe",
        "fsspec",
        "filelock",
        "numpy",
        "numpy.libs",
    ):
        if (site / name).exists():
            (only / name).symlink_to(site / name)
    (site_dir := next((env_dir / "lib").glob("python*/site-packages"))).mkdir(exist_ok=True)
    (site_dir / "only_torch.pth").write_text(str(only) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PIP_NO_INDEX"] = "1"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(site_dir),
            str(wheel),
        ],
        check=True,
        env=env,
        timeout=600,
    )
    code = (
        "import sys, torch\n"
        "from taid import TAIDLoss\n"
        "for m in ('transformers', 'accelerate', 'datasets', 'yaml', 'safetensors'):\n"
        "    assert m not in sys.modules, m\n"
        "loss = TAIDLoss(total_steps=10)\n"
        "out = loss.compute(torch.randn(2, 5, 11, requires_grad=True), torch.randn(2, 5, 11))\n"
        "out.loss.backward(); loss.step(out.distill)\n"
        "print('ok', round(loss.t, 3))\n"
        "import importlib.util\n"
        "print('transformers' , importlib.util.find_spec('transformers') is None)\n"
        "from taid.cli import train_main\n"
        "print('cli', train_main(['--config', 'x.yaml']))\n"
    )
    proc = subprocess.run(
        [str(python), "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok 0.4" in proc.stdout and "transformers True" in proc.stdout
    assert "cli 2" in proc.stdout and "pip install 'taid[train]'" in proc.stderr


@pytest.mark.slow
def test_load_builtin_gives_teacher_tokenizer_and_a_cut_student():
    from taid.config import ConfigError
    from taid.models import load_builtin

    teacher, tokenizer, student = load_builtin(student_layers=2)
    assert teacher.config.num_hidden_layers == 30 and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert student.config.num_hidden_layers == 2 and len(tokenizer) == 49152
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert load_builtin()[2] is None
    with pytest.raises(ConfigError, match="no built-in model 'nope'"):
        load_builtin("nope")


def test_a_converted_model_directory_is_not_private(tmp_path):
    import os
    import stat

    from taid import models as M

    umask = os.umask(0o022)
    try:
        M._write_atomically(tmp_path / "m", lambda d: (d / "f").write_text("x"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755


@pytest.mark.slow
def test_the_sdist_carries_the_test_helpers(tmp_path):
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--sdist",
            "--no-isolation",
            "-o",
            str(tmp_path),
            str(root),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (sdist,) = tmp_path.glob("taid-*.tar.gz")
    names = {
        Path(n).relative_to(Path(n).parts[0]).as_posix()
        for n in tarfile.open(sdist).getnames()
        if len(Path(n).parts) > 1
    }
    for needed in (
        "tests/conftest.py",
        "tests/reference.py",
        "tests/fsdp_cpu.py",
        "configs/smoke.yaml",
        "data/quickstart.jsonl",
        "docs/math.md",
    ):
        assert needed in names, needed
