"""The fused output-layer path and the chunked mechanism's own contracts.

Fused losses are checked against the naive float64 reference on logits formed in float64 from
the same hidden states and weights: the loss and the gradients w.r.t. hidden, weight and bias.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reference import PARAMS, make_inputs, reference
from taid import build_loss
from taid import functional as TF
from taid.chunked import default_chunk_size
from taid.divergences import DIVERGENCES
from taid.models import plain_linear_head

torch.set_num_threads(2)
NAMES = list(DIVERGENCES)
FUSED = {name: getattr(TF, f"fused_linear_{spec.function}") for name, spec in DIVERGENCES.items()}


def fused_inputs(shape=(3, 29), H=24, V=61, H_T=40, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 3).to(dtype)
    bias = (0.5 * torch.randn(V, generator=g)).to(dtype)
    t_hidden = torch.randn(*shape, H_T, generator=g).to(dtype)
    t_weight = (torch.randn(V, H_T, generator=g) / H_T**0.5 * 3).to(dtype)
    _, _, labels = make_inputs(shape, V, seed=seed, ignore_index=42)
    return hidden, weight, bias, t_hidden, t_weight, labels


def reference_fused(name, hidden, weight, bias, teacher_logits, labels, grad_scale):
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    logits = h @ w.T + (0 if b is None else b)
    loss = reference(name, logits, teacher_logits.double(), labels, PARAMS[name], ignore_index=42)
    (grad_scale * loss).backward()
    return loss, h.grad, w.grad, None if b is None else b.grad


def run_fused(name, hidden, weight, bias, teacher, labels, grad_scale, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    loss = FUSED[name](h, w, teacher, labels, student_bias=b, ignore_index=42, **PARAMS[name], **kw)
    (grad_scale * loss).backward()
    return loss, h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("teacher_kind", ["logits", "hidden"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_fused_matches_reference(name, teacher_kind, chunk_size):
    hidden, weight, bias, t_hidden, t_weight, labels = fused_inputs()
    t_logits = t_hidden.double() @ t_weight.double().T
    if teacher_kind == "logits":
        teacher, kw = t_logits.float(), {}
    else:
        teacher, kw = t_hidden, {"teacher_weight": t_weight}
    ours = run_fused(name, hidden, weight, bias, teacher, labels, 2.0, chunk_size=chunk_size, **kw)
    ref = reference_fused(name, hidden, weight, bias, t_logits, labels, 2.0)
    torch.testing.assert_close(ours[0].double(), ref[0].detach(), rtol=2e-5, atol=2e-6)
    for got, want, what in zip(ours[1:], ref[1:], ["hidden", "weight", "bias"]):
        torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-7, msg=what)
    assert torch.all(ours[1][labels == 42] == 0)


@pytest.mark.parametrize("name", ["taid", "jsd", "akl"])
def test_fused_bf16_inputs_and_weights(name):
    hidden, weight, bias, t_hidden, t_weight, labels = fused_inputs(dtype=torch.bfloat16, seed=1)
    ours = run_fused(
        name, hidden, weight, None, t_hidden, labels, 1.0, teacher_weight=t_weight, chunk_size=9
    )
    # reference on the logits the bf16 matmuls produce, then float64 math
    t_logits = (t_hidden @ t_weight.T).double()
    ref = reference_fused(name, hidden, weight, None, t_logits, labels, 1.0)
    assert ours[0].dtype == torch.float32
    assert ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.bfloat16
    torch.testing.assert_close(ours[0].double(), ref[0].detach(), rtol=2e-2, atol=2e-3)
    for got, want in zip(ours[1:3], ref[1:3]):
        err = (got.double() - want).norm() / want.norm()
        assert err < 3e-2


@pytest.mark.parametrize("name", ["taid", "fkl", "jsd"])
@pytest.mark.parametrize("teacher_kind", ["logits", "hidden"])
def test_fused_under_bf16_autocast_matches_float32(name, teacher_kind):
    """Float32 weights under bfloat16 autocast (``train.mixed_precision=bf16``): the products
    with the output layer run in bfloat16, the softmax arithmetic in float32, and loss and
    gradients stay within bfloat16 rounding of the float32 reference; gradients keep the
    weights' dtype."""
    hidden, weight, bias, t_hidden, t_weight, labels = fused_inputs(seed=2)
    if teacher_kind == "logits":
        teacher, kw = (t_hidden.double() @ t_weight.double().T).float(), {}
    else:
        teacher, kw = t_hidden, {"teacher_weight": t_weight}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = run_fused(name, hidden, weight, bias, teacher, labels, 2.0, chunk_size=7, **kw)
    t_logits = t_hidden.double() @ t_weight.double().T
    ref = reference_fused(name, hidden, weight, bias, t_logits, labels, 2.0)
    assert ours[0].dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in ours[1:])
    # bfloat16 keeps 8 bits of mantissa: relative error ~2^-8 per product
    torch.testing.assert_close(ours[0].double(), ref[0].detach(), rtol=3e-2, atol=3e-3)
    for got, want, what in zip(ours[1:], ref[1:], ["hidden", "weight", "bias"]):
        err = float((got.double() - want).norm() / want.norm())
        assert err < 3e-2, (what, err)


def test_fused_sum_reduction_and_vocab_slicing():
    hidden, weight, bias, _, _, labels = fused_inputs(V=64, seed=2)
    _, teacher, _ = make_inputs((3, 29), 70, seed=3)  # teacher padded to 70 rows
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = TF.fused_linear_forward_kl(
        h, w, teacher, labels, ignore_index=42, reduction="sum", vocab_size=60, chunk_size=11
    )
    loss.backward()
    ref = reference_fused("fkl", hidden, weight[:60], None, teacher[..., :60].double(), labels, 1.0)
    n_valid = int((labels != 42).sum())
    torch.testing.assert_close(loss.double(), ref[0].detach() * n_valid, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), ref[1] * n_valid, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(w.grad[:60].double(), ref[2] * n_valid, rtol=2e-4, atol=1e-6)
    assert torch.all(w.grad[60:] == 0)


def test_fused_with_tied_embeddings_matches_the_logits_path():
    """The output weight is the embedding: both uses' gradients add up."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 16)
    proj = nn.Linear(16, 16)
    ids = torch.randint(0, 50, (4, 9))
    teacher = torch.randn(4, 9, 50)

    def run(fused: bool):
        emb.zero_grad()
        proj.zero_grad()
        hidden = torch.tanh(proj(emb(ids)))
        if fused:
            loss = TF.fused_linear_taid_loss(hidden, emb.weight, teacher, t=0.6, chunk_size=5)
        else:
            loss = TF.taid_loss(hidden @ emb.weight.T, teacher, t=0.6, implementation="eager")
        loss.backward()
        return loss.detach(), emb.weight.grad.clone(), proj.weight.grad.clone()

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fused_cross_entropy_and_mixing():
    hidden, weight, bias, _, _, labels = fused_inputs(seed=4)
    _, teacher, _ = make_inputs((3, 29), 61, seed=5)
    loss_fn = build_loss("taid", total_steps=10, distill_weight=0.7, ignore_index=42)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = loss_fn.compute_fused(h1, w1, teacher, labels)
    out.loss.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    eager = build_loss(
        "taid", total_steps=10, distill_weight=0.7, ignore_index=42, implementation="eager"
    )
    ref = eager.compute(h2 @ w2.T, teacher, labels)
    ref.loss.backward()
    for a, b in [
        (out.loss, ref.loss),
        (out.distill, ref.distill),
        (out.ce, ref.ce),
        (h1.grad, h2.grad),
        (w1.grad, w2.grad),
    ]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert out.num_tokens == ref.num_tokens
    ce = TF.fused_linear_cross_entropy(hidden, weight, labels, ignore_index=42)
    torch.testing.assert_close(ce, TF.cross_entropy(hidden @ weight.T, labels, ignore_index=42))


def test_fused_all_masked_is_zero_with_zero_grads():
    hidden, weight, bias, _, _, labels = fused_inputs(seed=6)
    labels.fill_(42)
    loss, gh, gw, gb = run_fused("taid", hidden, weight, bias, torch.randn(3, 29, 61), labels, 1.0)
    assert loss.item() == 0.0
    assert torch.all(gh == 0) and torch.all(gw == 0) and torch.all(gb == 0)


def test_fused_refuses_per_position_reduction_and_bad_shapes():
    hidden, weight, _, _, _, labels = fused_inputs()
    teacher = torch.randn(3, 29, 61)
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        TF.fused_linear_forward_kl(hidden, weight, teacher, labels, reduction="none")
    with pytest.raises(ValueError, match=r"student_weight \(61, 23\)"):
        TF.fused_linear_forward_kl(hidden, weight[:, :23], teacher, labels)
    with pytest.raises(ValueError, match=r"teacher_weight \(61, 7\)"):
        TF.fused_linear_forward_kl(
            hidden, weight, torch.randn(3, 29, 8), labels, teacher_weight=torch.randn(61, 7)
        )
    with pytest.raises(TypeError, match="share a dtype"):
        TF.fused_linear_forward_kl(hidden.bfloat16(), weight, teacher, labels)


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunk_size_does_not_change_the_result(chunk_size):
    student, teacher, labels = make_inputs((5, 13), 37, seed=7)
    results = []
    for cs in (chunk_size, None):
        s = student.clone().requires_grad_(True)
        loss = TF.jsd(s, teacher, labels, ignore_index=42, chunk_size=cs)
        loss.backward()
        results.append((loss, s.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-9)


def test_chunked_backward_twice_is_refused():
    student, teacher, labels = make_inputs((2, 4), 11, seed=8)
    s = student.clone().requires_grad_(True)
    loss = TF.taid_loss(s, teacher, labels, t=0.5, ignore_index=42)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_default_chunk_size_bounds_temporaries():
    assert default_chunk_size(8, 100) == 8  # small inputs: one chunk
    for device in ("cpu", "cuda"):
        for n, v in [(1024, 32000), (4096, 49152), (4096, 128256), (16384, 151936)]:
            c = default_chunk_size(n, v, device)
            assert 1 <= c <= n
            assert c * v <= 2**25
            # a few chunk temporaries stay well under one N x V buffer, unless the chunk is at
            # the 2^22-element floor (16 MiB) that keeps GPU launches efficient
            assert c * 16 <= n or (device == "cuda" and c * v <= 2**22)
    assert default_chunk_size(4096, 49152, "cpu") * 49152 * 4 <= 2 * 2**20  # L2-sized on CPU
    assert default_chunk_size(4096, 49152, "cpu", min_rows=128) == 128
    assert default_chunk_size(100, 49152, "cpu", min_rows=128) == 100


class _Config:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Model(nn.Module):
    def __init__(self, **config):
        super().__init__()
        self.config = _Config(**config)
        self.head = nn.Linear(4, 10, bias=False)

    def get_output_embeddings(self):
        return self.head


def test_plain_linear_head_returns_the_weight():
    model = _Model(final_logit_softcapping=None, logits_scaling=1.0)
    weight, bias = plain_linear_head(model)
    assert weight is model.head.weight and bias is None


@pytest.mark.parametrize(
    "attr,value",
    [
        ("final_logit_softcapping", 30.0),
        ("logit_scale", 0.0625),
        ("logits_scaling", 8.0),
        ("lm_head_multiplier", 0.5),
    ],
)
def test_plain_linear_head_refuses_logit_transforms(attr, value):
    with pytest.raises(ValueError, match=f"{attr}={value}.*logits path"):
        plain_linear_head(_Model(**{attr: value}))


def test_plain_linear_head_refuses_non_linear_heads():
    model = _Model()
    model.head = nn.Sequential(nn.Linear(4, 10))
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        plain_linear_head(model)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_all_rows_valid_with_padded_vocabulary_zeroes_the_padding_gradient(chunk_size):
    """Every row valid takes the no-copy slice path; the gradient buffer is not pre-zeroed
    there, so the padding columns must be zeroed explicitly."""
    student, teacher, _ = make_inputs((3, 10), 40, seed=9)
    padded = torch.cat([student, torch.randn(3, 10, 6)], dim=-1)
    for _ in range(2):  # a second run reuses freed memory: garbage would show up here
        s = padded.clone().requires_grad_(True)
        loss = TF.reverse_kl(s, teacher, vocab_size=40, chunk_size=chunk_size)
        loss.backward()
        assert torch.all(s.grad[..., 40:] == 0)
    s_ref = student.clone().requires_grad_(True)
    TF.reverse_kl(s_ref, teacher, implementation="eager").backward()
    torch.testing.assert_close(loss, TF.reverse_kl(student, teacher, implementation="eager"))
    torch.testing.assert_close(s.grad[..., :40], s_ref.grad)


def test_fused_all_rows_valid_matches_reference():
    hidden, weight, bias, t_hidden, t_weight, _ = fused_inputs(seed=10)
    t_logits = t_hidden.double() @ t_weight.double().T
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = TF.fused_linear_taid_loss(
        h, w, t_hidden, None, t=0.37, teacher_weight=t_weight, chunk_size=6
    )
    (3 * loss).backward()
    hr = hidden.double().requires_grad_(True)
    wr = weight.double().requires_grad_(True)
    ref = reference("taid", hr @ wr.T, t_logits, None, PARAMS["taid"])
    (3 * ref).backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(h.grad.double(), hr.grad, rtol=2e-4, atol=2e-7)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=2e-4, atol=2e-7)


# --------------------------------------------------------------------------------------------
# Top-k teachers
# --------------------------------------------------------------------------------------------
def topk_of(teacher_logits: torch.Tensor, k: int):
    from taid.sources import TopKTeacher

    log_p = torch.log_softmax(teacher_logits.double(), -1).reshape(-1, teacher_logits.shape[-1])
    values, ids = log_p.topk(k, dim=-1)
    return TopKTeacher(values.float(), ids.int(), teacher_logits.shape[-1])


def test_topk_teacher_rebuilds_a_normalised_distribution_with_exact_top_entries():
    _, teacher, _ = make_inputs((3, 7), 50, seed=20)
    source = topk_of(teacher, 8)
    rebuilt = source.rows(slice(0, 21), 50).double()
    torch.testing.assert_close(
        rebuilt.logsumexp(-1), torch.zeros(21, dtype=torch.float64), atol=1e-5, rtol=0
    )
    log_p = torch.log_softmax(teacher.double(), -1).reshape(21, 50)
    top = log_p.topk(8, -1)
    torch.testing.assert_close(rebuilt.gather(1, top.indices), top.values, atol=1e-6, rtol=0)
    # every other id carries the same share of the remaining mass
    mask = torch.ones_like(rebuilt, dtype=torch.bool).scatter_(1, top.indices, False)
    rest = 1 - source.log_probs.double().exp().sum(-1)  # from the stored (float32) values
    torch.testing.assert_close(
        rebuilt[mask].reshape(21, 42), (rest / 42).log()[:, None].expand(21, 42), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("name", ["taid", "fkl", "jsd"])
def test_full_k_topk_teacher_is_exact(name):
    student, teacher, labels = make_inputs((3, 11), 37, seed=21)
    s1 = student.clone().requires_grad_(True)
    out = TF.loss_terms(
        name, s1, topk_of(teacher, 37), labels, ignore_index=42, chunk_size=5, **PARAMS[name]
    ).loss
    (2 * out).backward()
    s2 = student.double().requires_grad_(True)
    ref = reference(name, s2, teacher.double(), labels, PARAMS[name], ignore_index=42)
    (2 * ref).backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=2e-4, atol=1e-7)


def test_topk_teacher_loss_equals_the_loss_on_its_rebuilt_logits_and_improves_with_k():
    student, teacher, labels = make_inputs((4, 9), 64, seed=22, scale=4.0)
    exact = TF.taid_loss(student, teacher, labels, t=0.7, ignore_index=42)
    errors = []
    for k in (4, 16, 64):
        source = topk_of(teacher, k)
        via_source = TF.loss_terms("taid", student, source, labels, t=0.7, ignore_index=42).loss
        dense = source.rows(slice(0, 36), 64).reshape(4, 9, 64)
        torch.testing.assert_close(
            via_source, TF.taid_loss(student, dense, labels, t=0.7, ignore_index=42)
        )
        errors.append(abs(via_source.item() - exact.item()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5


def test_topk_teacher_refuses_bad_inputs():
    from taid.sources import TopKTeacher

    with pytest.raises(ValueError, match=r"\[N, k\]"):
        TopKTeacher(torch.zeros(4, 3), torch.zeros(4, 2, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="k = 11"):
        TopKTeacher(torch.zeros(4, 11), torch.zeros(4, 11, dtype=torch.long), 10)
    source = topk_of(torch.randn(2, 3, 10), 4)
    with pytest.raises(ValueError, match="covers 6 positions but the student's logits"):
        TF.forward_kl(torch.randn(2, 4, 10), source)
    with pytest.raises(ValueError, match="cannot be sliced"):
        TF.forward_kl(torch.randn(2, 3, 12), source, vocab_size=8)


@pytest.mark.parametrize("name", NAMES)
def test_fused_with_a_learned_temperature_matches_the_reference(name):
    hidden, weight, bias, t_hidden, t_weight, labels = fused_inputs(seed=3)
    t_logits = t_hidden.double() @ t_weight.double().T
    tau = torch.tensor(2.2, requires_grad=True)
    ours = run_fused(
        name,
        hidden,
        weight,
        bias,
        t_hidden,
        labels,
        2.0,
        chunk_size=5,
        teacher_weight=t_weight,
        temperature=tau,
        temperature_scaling=True,
    )
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = bias.detach().double().requires_grad_(True)
    tau64 = torch.tensor(2.2, dtype=torch.float64, requires_grad=True)
    ref = reference(
        name,
        h @ w.T + b,
        t_logits,
        labels,
        PARAMS[name],
        ignore_index=42,
        temperature=tau64,
        temperature_scaling=True,
    )
    (2.0 * ref).backward()
    torch.testing.assert_close(ours[0].detach().double(), ref.detach(), rtol=2e-5, atol=2e-6)
    for got, want in zip(ours[1:] + (tau.grad,), (h.grad, w.grad, b.grad, tau64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=1e-6)
