"""The teacher cache: write once, read back as the same teacher (exactly for ``hidden`` and
``full``, within a derived bound for ``topk``), resume, and refuse what does not match."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from launch import two_processes

from taid import cache as T
from taid import data as D
from taid import functional as TF
from taid import trainer as TR
from taid.config import load_config
from taid.losses import LOSSES, build_loss, loss_parameters
from taid.sources import TopKTeacher

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
SMALL = [
    "data.max_examples=24",
    "data.eval_size=4",
    "train.batch_size=4",
    "cache.examples_per_shard=8",
    "log.trackers=[]",
    "log.progress=false",
]


def config(tmp_path: Path, *overrides: str):
    return load_config(
        SMOKE,
        [
            f"output_dir={tmp_path / 'run'}",
            f"teacher.cache_dir={tmp_path / 'cache'}",
            *SMALL,
            *overrides,
        ],
    )


_WRITTEN: dict[tuple[str, ...], Path] = {}  # overrides -> a cache written once per module


@pytest.fixture(scope="module", autouse=True)
def _written_once(tmp_path_factory):
    """Caches written by :func:`written`, shared by this module's tests (each gets a copy)."""
    _WRITTEN.clear()
    _WRITTEN[("__root__",)] = tmp_path_factory.mktemp("written")
    yield
    _WRITTEN.clear()


def written(tmp_path: Path, *overrides: str):
    """The config of ``tmp_path`` with its cache written: a copy of the module's cache of the
    same settings (writing is the slow part of these tests), or a fresh write."""
    cfg = config(tmp_path, *overrides)
    if overrides not in _WRITTEN:
        store = _WRITTEN[("__root__",)] / f"cache-{len(_WRITTEN)}"
        T.write_cache(
            config(store.parent / f"run-{len(_WRITTEN)}", *overrides, f"teacher.cache_dir={store}")
        )
        _WRITTEN[overrides] = store
    shutil.copytree(_WRITTEN[overrides], cfg.teacher.cache_dir)
    return cfg


def setups(tmp_path: Path, *overrides: str):
    """The same run beside the teacher and from the cache (same student initialisation)."""
    online = TR.build(config(tmp_path, *overrides))
    cached = TR.build(config(tmp_path, "teacher.source=cache", *overrides))
    return online, cached


def first_batch(s: TR.Setup) -> dict[str, torch.Tensor]:
    stream = D.BatchStream(
        s.train_examples,
        s.config.train.batch_size,
        seed=0,
        pad_id=s.tokenizer.pad_token_id,
        packed=s.config.data.packing,
    )
    return next(iter(stream))


# --------------------------------------------------------------------------------------------
# Storage details
# --------------------------------------------------------------------------------------------
def _reference_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest values first; equal values by smallest id (plain Python sort per row)."""
    values, ids = [], []
    for row in x.tolist():
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        ids.append(order)
        values.append([row[i] for i in order])
    return torch.tensor(values, dtype=x.dtype), torch.tensor(ids)


@pytest.mark.parametrize("k", [1, 3, 8, 16])
def test_canonical_topk_orders_ties_by_id_and_keeps_the_smallest_tied_ids(k):
    # Few distinct values, so ties inside the top-k and across its boundary are everywhere.
    g = torch.Generator().manual_seed(k)
    x = torch.randint(0, 4, (64, 37), generator=g).float().log_softmax(-1)
    x[0] = 0.5  # a row of equal values: the top-k are ids 0..k-1
    values, ids = T.canonical_topk(x.clone(), k)
    want_values, want_ids = _reference_topk(x, k)
    assert torch.equal(ids, want_ids)
    assert torch.equal(values, want_values)
    assert ids[0].tolist() == list(range(k))


def test_canonical_topk_does_not_depend_on_the_number_of_threads():
    x = torch.randint(0, 3, (512, 4099), generator=torch.Generator().manual_seed(0)).float()
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append(T.canonical_topk(x, 64))
    finally:
        torch.set_num_threads(before)
    for values, ids in results[1:]:
        assert torch.equal(values, results[0][0]) and torch.equal(ids, results[0][1])
    assert torch.equal(results[0][1][:8], _reference_topk(x[:8], 64)[1])


@pytest.mark.parametrize("vocab", [2, 255, 256, 257, 49152, 65536, 65537, 128256])
def test_packed_ids_round_trip(vocab):
    ids = torch.randint(0, vocab, (5, 7))
    ids[0, 0], ids[0, 1] = 0, vocab - 1
    nbytes = T.id_bytes(vocab)
    assert 2 ** (8 * nbytes) >= vocab > 2 ** (8 * (nbytes - 1)) or nbytes == 1
    packed = T.pack_ids(ids, nbytes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 7, nbytes)
    assert torch.equal(T.unpack_ids(packed), ids)


def test_topk_at_k64_stores_260_bytes_per_token_or_less(tmp_path):
    cfg = written(tmp_path)
    cache = T.TeacherCache(cfg.teacher.cache_dir)
    # 64 float16 log-probs + 64 two-byte ids = 256 bytes, plus the offsets and headers
    assert 256 <= cache.bytes_per_token() <= 260
    assert cache.manifest["id_bytes"] == 2 and cache.manifest["dtype"] == "float16"


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["hidden", "full"])
@pytest.mark.parametrize("fused", [True, False])
def test_exact_modes_give_the_online_loss_for_every_registered_loss(tmp_path, mode, fused):
    impl = "auto" if fused else "chunked"
    written(tmp_path, f"cache.mode={mode}", "cache.dtype=float32")
    online, cached = setups(
        tmp_path, f"cache.mode={mode}", "cache.dtype=float32", f"loss.implementation={impl}"
    )
    assert online.fused is fused and cached.cache is not None and cached.teacher is None
    batch = first_batch(online)
    for name in LOSSES:
        kwargs = {"total_steps": 10} if "total_steps" in loss_parameters(name) else {}
        loss_fn = build_loss(name, reduction="sum", vocab_size=online.vocab_size, **kwargs)
        want = TR.batch_loss(online, batch, loss_fn)
        got = TR.batch_loss(cached, batch, loss_fn)
        assert got.num_tokens == want.num_tokens
        # CTKD compares distributions at tau ~ 15.6 and multiplies by tau^2: float32 rounding
        # of the logits (cached vs recomputed) weighs ~50x more in its value.
        rtol = 2e-4 if name == "ctkd" else 1e-5
        torch.testing.assert_close(got.loss, want.loss, rtol=rtol, atol=0, msg=name)


def test_topk_loss_is_within_the_derived_bound(tmp_path):
    """With the tail of each row replaced by its mean, ``r`` the tail mass and ``m = V - k``:
    ``|KL(p^||q) - KL(p||q)| <= r * (log m + range over the tail of log q)`` per token (the
    entropy term moves by ``r * (H_tail - log m)``, the cross term by at most ``r`` times the
    range), and the gradient ``q - p`` moves by at most ``2 r`` in L1 per token."""
    written(tmp_path, "cache.dtype=float32")
    online, cached = setups(tmp_path, "cache.dtype=float32", "loss.implementation=chunked")
    batch = first_batch(online)
    student_logits = online.student(**TR.model_inputs(batch)).logits.detach()
    labels = batch["labels"]
    losses, grads = [], []
    for s in (online, cached):
        x = student_logits.clone().requires_grad_(True)
        TF.forward_kl(x, TR.teacher_source(s, batch), labels).backward()  # mean over n tokens
        losses.append(
            TF.forward_kl(x.detach(), TR.teacher_source(s, batch), labels, reduction="none")
        )
        grads.append(x.grad)
    valid = labels != -100
    n, vocab, k = int(valid.sum()), student_logits.shape[-1], 64
    p = (
        torch.log_softmax(
            TR.teacher_source(online, batch).rows(slice(0, labels.numel()), vocab).double(), -1
        )
        .reshape(*labels.shape, vocab)[valid]
        .exp()
    )
    top = p.topk(k, -1).indices
    tail = torch.ones_like(p, dtype=torch.bool).scatter_(1, top, False)
    r = (p * tail).sum(-1)
    log_q = torch.log_softmax(student_logits.double(), -1)[valid]
    spread = log_q.masked_fill(~tail, -math.inf).amax(-1) - log_q.masked_fill(~tail, math.inf).amin(
        -1
    )
    bound = r * (math.log(vocab - k) + spread)
    err = (losses[1] - losses[0]).double()[valid].abs()
    assert (err <= bound + 1e-5).all()
    assert err.max() > 1e-4  # the reconstruction is not the teacher: the test can fail
    g_err = (grads[1] - grads[0]).double()[valid].abs().sum(-1)
    assert (g_err <= 2 * r / n + 1e-6).all()


def test_every_registered_loss_trains_from_a_topk_cache(tmp_path):
    written(tmp_path)
    cached = TR.build(config(tmp_path, "teacher.source=cache"))
    batch = first_batch(cached)
    for name in LOSSES:
        kwargs = {"total_steps": 10} if "total_steps" in loss_parameters(name) else {}
        loss_fn = build_loss(name, reduction="sum", vocab_size=cached.vocab_size, **kwargs)
        cached.student.zero_grad()
        out = TR.batch_loss(cached, batch, loss_fn)
        out.loss.backward()
        grads = [p.grad for p in cached.student.parameters() if p.grad is not None]
        assert torch.isfinite(out.loss) and grads, name
        assert all(torch.isfinite(g).all() for g in grads), name
        assert out.num_tokens == (batch["labels"] != -100).sum()


def test_topk_bound_on_peaked_teachers_tightens_with_k():
    """The same bound on sharper, LLM-like distributions, where the tail mass is small."""
    g = torch.Generator().manual_seed(3)
    vocab = 500
    teacher = torch.randn(64, vocab, generator=g) * 4
    student = torch.randn(64, vocab, generator=g) * 2
    log_p = torch.log_softmax(teacher.double(), -1)
    exact = TF.forward_kl(student, teacher, reduction="none").double()
    previous = math.inf
    for k in (8, 32, 128):
        top = log_p.topk(k, -1)
        source = TopKTeacher(top.values.float(), top.indices, vocab)
        approx = TF.loss_terms("fkl", student, source, reduction="none").loss.double()
        tail = torch.ones_like(log_p, dtype=torch.bool).scatter_(1, top.indices, False)
        r = (log_p.exp() * tail).sum(-1)
        log_q = torch.log_softmax(student.double(), -1)
        spread = log_q.masked_fill(~tail, -math.inf).amax(-1) - log_q.masked_fill(
            ~tail, math.inf
        ).amin(-1)
        err = (approx - exact).abs()
        assert (err <= r * (math.log(vocab - k) + spread) + 1e-5).all()
        assert err.mean() < previous
        previous = err.mean()


@pytest.mark.parametrize("mode", ["topk", "hidden", "full"])
def test_training_from_each_mode_runs_and_evaluates(tmp_path, mode):
    cfg = written(
        tmp_path,
        f"cache.mode={mode}",
        "train.max_steps=2",
        "train.save_every=0",
        "train.eval_every=0",
    )
    result = TR.train(
        load_config(
            SMOKE,
            [
                f"output_dir={tmp_path / 'run'}",
                f"teacher.cache_dir={cfg.teacher.cache_dir}",
                "teacher.source=cache",
                f"cache.mode={mode}",
                *SMALL,
                "train.max_steps=2",
                "train.save_every=0",
                "train.eval_every=0",
            ],
        )
    )
    after = result["after"]
    assert result["steps"] == 2 and math.isfinite(after["eval/kl_teacher_student"])
    assert after["eval/teacher_ppl"] > 1 and result["setup"].teacher is None
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert all(0 <= r["data_s"] < r["step_s"] for r in steps)


def test_a_run_in_the_process_that_wrote_the_cache_chooses_its_own_precision(tmp_path):
    """Writing a cache then training from it in one process (a notebook, the comparison
    script): the writer must not fix accelerate's process-wide mixed precision."""
    store = tmp_path / "cache"
    T.write_cache(config(tmp_path / "w", "cache.mode=hidden", f"teacher.cache_dir={store}"))
    result = TR.train(
        config(
            tmp_path / "run",
            "cache.mode=hidden",
            f"teacher.cache_dir={store}",
            "teacher.source=cache",
            "train.mixed_precision=bf16",
            "train.max_steps=2",
            "train.save_every=0",
            "train.eval_every=0",
        )
    )
    assert result["setup"].accelerator.mixed_precision == "bf16"
    assert math.isfinite(result["after"]["eval/kl_teacher_student"])


# --------------------------------------------------------------------------------------------
# Writing: resume, several processes
# --------------------------------------------------------------------------------------------
def _contents(root: Path) -> list[dict[str, torch.Tensor]]:
    """Every shard's tensors (file bytes differ between writes: safetensors stores its header
    metadata in no fixed order)."""
    from safetensors.torch import load_file

    return [load_file(str(p)) for p in sorted(root.glob("shard-*"))]


def _same_contents(a: Path, b: Path) -> None:
    left, right = _contents(a), _contents(b)
    assert len(left) == len(right)
    for x, y in zip(left, right):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _stamps(root: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.glob("shard-*")}


@pytest.mark.parametrize("where", ["data", "header"])
def test_rerunning_the_writer_rewrites_a_corrupted_shard(tmp_path, where):
    cfg = written(tmp_path)
    root = Path(cfg.teacher.cache_dir)
    manifest = json.loads((root / T.MANIFEST).read_text())
    shard = root / "shard-00001.safetensors"
    original = shard.read_bytes()
    data = bytearray(original)
    # a byte of the last tensor's data, or of the JSON header (after its 8-byte length)
    offset = len(data) - 7 if where == "data" else 8 + 40
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))
    before = _stamps(root)
    T.write_cache(cfg)  # the rerun must not stamp the flipped byte as valid
    after = _stamps(root)
    assert after["shard-00001.safetensors"] != before["shard-00001.safetensors"]  # rewritten
    assert after["shard-00000.safetensors"] == before["shard-00000.safetensors"]  # kept
    assert shard.read_bytes() == original
    assert json.loads((root / T.MANIFEST).read_text())["shards"] == manifest["shards"]
    T.TeacherCache(root)  # verifies every shard against the manifest


def test_an_interrupted_write_resumes_and_keeps_finished_shards(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    real = T._atomic_save
    calls = []

    def crash_on_second_shard(tensors, path, metadata):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        real(tensors, path, metadata)

    monkeypatch.setattr(T, "_atomic_save", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        T.write_cache(cfg)
    root = Path(cfg.teacher.cache_dir)
    assert not (root / T.MANIFEST).exists() and sorted(_stamps(root)) == ["shard-00000.safetensors"]
    before = _stamps(root)
    monkeypatch.setattr(T, "_atomic_save", real)
    T.write_cache(cfg)
    after = _stamps(root)
    assert after["shard-00000.safetensors"] == before["shard-00000.safetensors"]  # kept
    assert sorted(after) == [f"shard-{j:05d}.safetensors" for j in range(3)]
    assert not list(root.glob(".*tmp*"))
    resumed = json.loads((root / T.MANIFEST).read_text())

    # The same cache written in one go
    other = config(tmp_path / "again")
    T.write_cache(other)
    fresh = json.loads((Path(other.teacher.cache_dir) / T.MANIFEST).read_text())
    for key in ("dataset_sha256", "teacher_weights_sha256", "tokenizer_sha256", "identity"):
        assert resumed[key] == fresh[key]
    _same_contents(root, Path(other.teacher.cache_dir))

    # A deleted shard is written again, the others are left alone; the cache reads back
    (root / "shard-00001.safetensors").unlink()
    T.write_cache(cfg)
    again = _stamps(root)
    assert again["shard-00000.safetensors"] == after["shard-00000.safetensors"]
    assert again["shard-00002.safetensors"] == after["shard-00002.safetensors"]
    assert json.loads((root / T.MANIFEST).read_text())["shards"] == resumed["shards"]


def test_a_cache_of_other_settings_is_not_overwritten_silently(tmp_path):
    written(tmp_path)
    with pytest.raises(T.CacheError, match=r"k differs: cache 64, now 32\).*overwrite=true"):
        T.write_cache(config(tmp_path, "cache.k=32"))
    T.write_cache(config(tmp_path, "cache.k=32", "cache.overwrite=true"))
    assert T.TeacherCache(tmp_path / "cache").manifest["k"] == 32


@pytest.mark.slow
def test_two_processes_write_the_same_cache_as_one(tmp_path):
    two = tmp_path / "two"
    proc = two_processes(
        ROOT / "scripts" / "cache_teacher.py",
        "--config",
        str(SMOKE),
        f"teacher.cache_dir={two}",
        *SMALL,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "bytes per token" in proc.stdout
    cfg = written(tmp_path)
    one = json.loads((Path(cfg.teacher.cache_dir) / T.MANIFEST).read_text())
    both = json.loads((two / T.MANIFEST).read_text())
    assert len(both["shards"]) == 3 and both["identity"] == one["identity"]
    _same_contents(two, Path(cfg.teacher.cache_dir))


# --------------------------------------------------------------------------------------------
# Refusing what does not match, before training
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, field",
    [
        ("cache.k=32", "k"),
        ("cache.mode=hidden", "mode"),
        ("cache.dtype=bfloat16", "dtype"),
        ("data.max_length=64", "tokenization.max_length"),
        ("data.loss_on=all", "tokenization.loss_on"),
        ("data.max_examples=20", "tokenization.max_examples"),
        ("teacher.architecture.hidden_size=32", "teacher"),
    ],
)
def test_every_setting_mismatch_is_named_with_both_values(tmp_path, override, field):
    written(tmp_path)
    with pytest.raises(T.CacheError, match=rf"{field} differs \(cache: .+, this run: .+\)"):
        TR.build(config(tmp_path, "teacher.source=cache", override))


def test_changed_data_tokenizer_vocabulary_or_teacher_weights_are_named(tmp_path, monkeypatch):
    cfg = written(tmp_path)
    root = Path(cfg.teacher.cache_dir)
    data = tmp_path / "data.jsonl"
    rows = (ROOT / "data" / "quickstart.jsonl").read_text().splitlines()
    row = json.loads(rows[3])
    row["messages"][0]["content"] = "Hi. " + row["messages"][0]["content"]
    rows[3] = json.dumps(row)
    data.write_text("\n".join(rows) + "\n")
    with pytest.raises(T.CacheError, match="dataset_sha256 differs"):
        TR.build(config(tmp_path, "teacher.source=cache", f"data.path={data}"))

    manifest = json.loads((root / T.MANIFEST).read_text())
    for key, value, match in [
        ("tokenizer_sha256", "0" * 64, "tokenizer_sha256 differs"),
        (
            "vocab_size",
            50000,
            r"vocab_size differs \(cache: 50000, this run distils over "
            r"49152",
        ),
    ]:
        edited = {**manifest, key: value}
        (root / T.MANIFEST).write_text(json.dumps(edited))
        with pytest.raises(T.CacheError, match=match):
            TR.build(config(tmp_path, "teacher.source=cache"))
    (root / T.MANIFEST).write_text(json.dumps({**manifest, "teacher_weights_sha256": "f" * 64}))
    with pytest.raises(T.CacheError, match="teacher_weights_sha256 differs"):  # teacher loaded
        TR.build(
            config(
                tmp_path, "teacher.source=cache", "student.init=teacher_layers", "student.layers=1"
            )
        )


def test_missing_truncated_and_corrupt_shards_are_named(tmp_path):
    cfg = written(tmp_path)
    root = Path(cfg.teacher.cache_dir)
    shard = root / "shard-00001.safetensors"
    original = shard.read_bytes()

    shard.unlink()
    with pytest.raises(T.CacheError, match="shard-00001.safetensors is missing"):
        T.TeacherCache(root)
    shard.write_bytes(original[:-10])
    with pytest.raises(T.CacheError, match="shard-00001.safetensors has .* bytes"):
        T.TeacherCache(root)
    corrupt = bytearray(original)
    corrupt[len(corrupt) // 2] ^= 0xFF
    shard.write_bytes(bytes(corrupt))
    cache = T.TeacherCache(root)
    cache.example_rows([0])  # shard 0 is intact
    with pytest.raises(T.CacheError, match="shard-00001.safetensors is corrupt"):
        cache.example_rows([8])
    with pytest.raises(T.CacheError, match="no teacher cache"):
        T.TeacherCache(tmp_path / "nowhere")


def test_rows_that_do_not_match_the_batch_are_refused(tmp_path):
    cfg = written(tmp_path)
    cache = T.TeacherCache(cfg.teacher.cache_dir)
    labels = torch.full((1, 5), -100)
    labels[0, :2] = 1
    with pytest.raises(T.CacheError, match="target rows for examples .* but the batch has 2"):
        cache.source([0], labels)
    with pytest.raises(T.CacheError, match="example 99 is not in the teacher cache"):
        cache.example_rows([99])


def test_packed_batches_read_each_examples_rows_in_order(tmp_path):
    written(tmp_path, "cache.mode=full", "cache.dtype=float32", "data.max_length=256")
    online, cached = setups(
        tmp_path,
        "cache.mode=full",
        "cache.dtype=float32",
        "data.packing=true",
        "data.max_length=256",
    )
    batch = first_batch(online)
    assert batch["example_ids"].numel() > batch["input_ids"].shape[0]  # rows hold several
    loss_fn = build_loss("fkl", reduction="sum", vocab_size=online.vocab_size)
    torch.testing.assert_close(
        TR.batch_loss(cached, batch, loss_fn).loss,
        TR.batch_loss(online, batch, loss_fn).loss,
        rtol=1e-5,
        atol=0,
    )
