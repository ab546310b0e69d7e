"""Loading models and tokenizers: the built-in teacher's tokenizer without its weights."""

from __future__ import annotations

import pytest


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
