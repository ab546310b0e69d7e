"""Every divergence on logits against the naive float64 reference (tests/reference.py):
values and gradients, for the eager and the chunked implementations."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from reference import PARAMS, make_inputs, reference
from taid import functional as TF
from taid.divergences import DIVERGENCES

torch.set_num_threads(2)

# name -> (public function, hyperparameters used in the tests), from the registry
PUBLIC = {name: (getattr(TF, spec.function), PARAMS[name]) for name, spec in DIVERGENCES.items()}
NAMES = list(PUBLIC)


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------
# implementation -> keyword arguments: eager autograd, chunked with the default chunk size, and
# chunked with 7 rows per chunk (does not divide the number of valid rows in the tests)
IMPLS = {
    "eager": {"implementation": "eager"},
    "chunked": {"implementation": "chunked"},
    "chunked-7": {"implementation": "chunked", "chunk_size": 7},
}


@pytest.fixture(params=list(IMPLS))
def impl(request):
    return request.param


def run_ours(
    name,
    student,
    teacher,
    labels,
    *,
    ignore_index,
    reduction="mean",
    grad_scale=2.0,
    params=None,
    impl="chunked",
):
    fn, default_params = PUBLIC[name]
    s = student.clone().requires_grad_(True)
    out = fn(
        s,
        teacher,
        labels,
        ignore_index=ignore_index,
        reduction=reduction,
        **(default_params if params is None else params),
        **IMPLS[impl],
    )
    (out * grad_scale).sum().backward()
    return out, s.grad


def run_reference(
    name, student, teacher, labels, *, ignore_index, reduction="mean", grad_scale=2.0, params=None
):
    s = student.detach().double().requires_grad_(True)
    out = reference(
        name,
        s,
        teacher,
        labels,
        PUBLIC[name][1] if params is None else params,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    (out * grad_scale).sum().backward()
    return out, s.grad


# ------------------------------------------------------------------------------------------
# Values and gradients against the reference
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_odd_shape_masked(name, reduction, impl):
    student, teacher, labels = make_inputs((3, 47), 123, ignore_index=42)
    assert (labels == 42).float().mean() > 0.15  # a real share of positions is masked
    ours, g = run_ours(
        name, student, teacher, labels, ignore_index=42, impl=impl, reduction=reduction
    )
    ref, g_ref = run_reference(name, student, teacher, labels, ignore_index=42, reduction=reduction)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=2e-4, atol=1e-7)
    # masked positions get exactly zero gradient
    assert torch.all(g[labels == 42] == 0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape,V", [((17,), 5), ((2, 3, 5), 31), ((1, 1), 2)])
def test_matches_reference_other_shapes_default_ignore_index(name, shape, V, impl):
    student, teacher, labels = make_inputs(shape, V, ignore_index=-100, seed=1)
    ours, g = run_ours(name, student, teacher, labels, ignore_index=-100, impl=impl, grad_scale=0.5)
    ref, g_ref = run_reference(name, student, teacher, labels, ignore_index=-100, grad_scale=0.5)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_labels_none_counts_every_position(name, impl):
    student, teacher, _ = make_inputs((4, 9), 37, seed=2)
    if DIVERGENCES[name].needs_labels:
        with pytest.raises(ValueError, match=f"divergence '{name}' needs labels"):
            run_ours(name, student, teacher, None, ignore_index=-100, impl=impl)
        return
    ours, g = run_ours(name, student, teacher, None, ignore_index=-100, impl=impl)
    ref, g_ref = run_reference(name, student, teacher, None, ignore_index=-100)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_compute_in_float32(name, dtype, impl):
    student, teacher, labels = make_inputs((3, 47), 123, dtype=dtype, seed=3)
    ours, g = run_ours(name, student, teacher, labels, ignore_index=42, impl=impl)
    # The reference sees the same rounded inputs, so only the float32 arithmetic and the
    # rounding of the returned gradient to the input dtype differ.
    ref, g_ref = run_reference(name, student, teacher, labels, ignore_index=42)
    assert ours.dtype == torch.float32
    assert g.dtype == dtype
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_neg_inf_vocabulary_slots(name, impl):
    student, teacher, labels = make_inputs((3, 11), 29, seed=4)
    masked_vocab = torch.tensor([0, 5, 6, 28])
    student[..., masked_vocab] = -math.inf
    teacher[..., masked_vocab] = -math.inf
    ours, g = run_ours(name, student, teacher, labels, ignore_index=42, impl=impl)
    ref, g_ref = run_reference(name, student, teacher, labels, ignore_index=42)
    assert torch.isfinite(ours).all() and torch.isfinite(g).all()
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=2e-4, atol=1e-7)
    assert torch.all(g[..., masked_vocab] == 0)


@pytest.mark.parametrize("name", ["taid", "fkl", "tvd", "jsd", "skl", "srkl"])
def test_teacher_only_neg_inf_stays_finite(name, impl):
    """The teacher rules a token out (p = 0) while the student still gives it mass."""
    student, teacher, labels = make_inputs((2, 7), 19, seed=5)
    teacher[..., 3] = -math.inf
    ours, g = run_ours(name, student, teacher, labels, ignore_index=42, impl=impl)
    ref, g_ref = run_reference(name, student, teacher, labels, ignore_index=42)
    assert torch.isfinite(ours).all() and torch.isfinite(g).all()
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize(
    "name,params",
    [("taid", {"t": 0.37}), ("taid", {"t": 1.0})]
    + [(n, PUBLIC[n][1]) for n in NAMES if n != "taid"],
)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_a_slot_masked_on_one_side_is_exact_or_a_clear_error(name, params, side, impl):
    """Where the true value is +inf (the reference says so), the loss refuses with the side
    named; where it is finite, every path gives the reference's value."""
    student, teacher, labels = make_inputs((2, 7), 19, seed=9)
    (student if side == "student" else teacher)[..., 3] = -math.inf
    ref, _ = run_reference(name, student, teacher, labels, ignore_index=42, params=params)
    if not torch.isfinite(ref):
        with pytest.raises(
            ValueError,
            match=rf"loss is infinite.*the {side}'s logits are -inf "
            rf"at vocabulary ids \[3\]",
        ):
            run_ours(name, student, teacher, labels, ignore_index=42, params=params, impl=impl)
        return
    ours, g = run_ours(name, student, teacher, labels, ignore_index=42, params=params, impl=impl)
    _, g_ref = run_reference(name, student, teacher, labels, ignore_index=42, params=params)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=2e-4, atol=1e-7)


def test_cross_entropy_of_a_masked_label_is_a_clear_error(impl):
    student, _, labels = make_inputs((2, 7), 19, seed=9)
    labels[0, 0] = 3
    student[0, 0, 3] = -math.inf
    with pytest.raises(ValueError, match=r"cross-entropy loss is infinite.*label 3"):
        TF.cross_entropy(student, labels, ignore_index=42, **IMPLS[impl])


@pytest.mark.parametrize("name", NAMES)
def test_huge_negative_padding_logits_do_not_overflow(name, impl):
    student, teacher, labels = make_inputs((2, 5), 13, seed=6)
    student[..., -3:] = -3e38
    teacher[..., -3:] = -3e38
    labels[(labels >= 10) & (labels != 42)] = 1  # targets among the real slots
    ours, g = run_ours(name, student, teacher, labels, ignore_index=42, impl=impl)
    assert torch.isfinite(ours).all() and torch.isfinite(g).all()
    ref_s, ref_t = student[..., :-3], teacher[..., :-3]
    ref, g_ref = run_reference(name, ref_s, ref_t, labels, ignore_index=42)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g[..., :-3].double(), g_ref, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("name", NAMES + ["ce"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_masked_gives_zero_loss_and_zero_grad(name, reduction, impl):
    student, teacher, labels = make_inputs((2, 6), 17, seed=7)
    labels.fill_(-7)
    s = student.clone().requires_grad_(True)
    if name == "ce":
        out = TF.cross_entropy(s, labels, ignore_index=-7, reduction=reduction, **IMPLS[impl])
    else:
        fn, params = PUBLIC[name]
        out = fn(s, teacher, labels, ignore_index=-7, reduction=reduction, **params, **IMPLS[impl])
    out.sum().backward()
    assert torch.all(out == 0)
    assert s.grad is not None and torch.all(s.grad == 0)


# ------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------
def test_taid_at_t0_is_zero_with_zero_gradient(impl):
    student, teacher, labels = make_inputs((3, 8), 50, seed=8)
    loss, g = run_ours(
        "taid", student, teacher, labels, ignore_index=42, impl=impl, params={"t": 0.0}
    )
    assert loss.item() == 0.0
    if impl == "eager":  # autograd rounds q and p_t differently: zero up to float32 rounding
        assert g.abs().max() < 1e-7
    else:  # the analytic gradient q - p_t is exactly zero
        assert torch.all(g == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_taid_at_t1_equals_forward_kl(reduction, impl):
    student, teacher, labels = make_inputs((3, 8), 50, seed=9)
    taid, g_taid = run_ours(
        "taid",
        student,
        teacher,
        labels,
        ignore_index=42,
        impl=impl,
        reduction=reduction,
        params={"t": 1.0},
    )
    fkl, g_fkl = run_ours(
        "fkl", student, teacher, labels, ignore_index=42, impl=impl, reduction=reduction
    )
    torch.testing.assert_close(taid, fkl, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_taid, g_fkl, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_identical_student_and_teacher_give_zero(name, impl):
    student, _, labels = make_inputs((4, 5), 40, seed=10)
    loss, g = run_ours(name, student, student.clone(), labels, ignore_index=42, impl=impl)
    assert abs(loss.item()) < 1e-6
    assert g.abs().max() < 1e-6


@pytest.mark.parametrize("t", [0.0, 0.2, 0.73, 1.0])
def test_taid_gradient_is_q_minus_pt_over_valid_tokens(t, impl):
    student, teacher, labels = make_inputs((5, 7), 33, seed=11)
    loss, g = run_ours(
        "taid",
        student,
        teacher,
        labels,
        ignore_index=42,
        impl=impl,
        grad_scale=1.0,
        params={"t": t},
    )
    valid = labels != 42
    q = torch.softmax(student.double(), -1)
    pt = torch.softmax((1 - t) * student.double() + t * teacher.double(), -1)
    expected = torch.where(valid[..., None], (q - pt) / valid.sum(), 0.0)
    torch.testing.assert_close(g.double(), expected, rtol=1e-4, atol=1e-8)


def test_taid_interpolates_logits_not_probabilities():
    """A probability mixture (skew KL) is a different method; pin the logit-space target."""
    s = torch.tensor([[2.0, 0.0, -2.0]])
    z = torch.tensor([[-2.0, 0.0, 2.0]])
    t = 0.5
    # logit-space midpoint is uniform; a probability mixture is not
    per = TF.taid_loss(s, z, t=t, reduction="none")
    q = torch.softmax(s, -1)
    uniform = torch.full_like(q, 1 / 3)
    expected = (uniform * (uniform.log() - q.log())).sum()
    torch.testing.assert_close(per[0], expected)


def test_teacher_never_receives_gradient(impl):
    student, teacher, labels = make_inputs((2, 3), 10, seed=12)
    for name, (fn, params) in PUBLIC.items():
        s = student.clone().requires_grad_(True)
        z = teacher.clone().requires_grad_(True)
        fn(s, z, labels, ignore_index=42, **params, **IMPLS[impl]).backward()
        assert z.grad is None, name
        assert s.grad is not None, name


def test_forward_and_reverse_kl_sanity_values():
    """A hand-computed case, independent of the reference code."""
    s = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    z = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    fkl = 0.25 * math.log(0.5) + 0.5 * math.log(2.0)
    rkl = 0.5 * math.log(2.0) + 0.25 * math.log(0.5)
    assert TF.forward_kl(s, z).item() == pytest.approx(fkl, abs=1e-7)
    assert TF.reverse_kl(s, z).item() == pytest.approx(rkl, abs=1e-7)
    assert TF.tvd(s, z).item() == pytest.approx(0.25, abs=1e-7)


def test_skew_with_alpha_zero_reduces_to_plain_kl():
    student, teacher, labels = make_inputs((3, 4), 21, seed=13)
    torch.testing.assert_close(
        TF.skew_kl(student, teacher, labels, alpha=0.0, ignore_index=42),
        TF.forward_kl(student, teacher, labels, ignore_index=42),
    )
    torch.testing.assert_close(
        TF.skew_reverse_kl(student, teacher, labels, alpha=0.0, ignore_index=42),
        TF.reverse_kl(student, teacher, labels, ignore_index=42),
    )


def test_adaptive_kl_head_is_mapped_back_to_vocabulary_order():
    """Regression: the reference code computed the head in sorted order and applied it in
    vocabulary order. Teacher mass sits on the LAST token, so an unmapped mask would put the
    first token in the head instead."""
    z = torch.log(torch.tensor([[0.05, 0.05, 0.9]]))
    s = torch.log(torch.tensor([[0.2, 0.2, 0.6]]))
    gap = torch.tensor([0.15, 0.15, 0.3])
    w_head = 0.3 / gap.sum()  # head = {token 2} only
    expected = w_head * TF.forward_kl(s, z) + (1 - w_head) * TF.reverse_kl(s, z)
    torch.testing.assert_close(TF.adaptive_kl(s, z, mu=0.5), expected)


def test_adaptive_kl_heads_wider_and_narrower_than_its_top_k_candidates(impl):
    """The head is searched among the teacher's top candidates, with a full sort for the rows
    whose candidates hold less than mu: a vocabulary wider than the candidates, with peaked
    teacher rows (a head of one or two tokens) and near-uniform ones (a head of about half the
    vocabulary), matches the float64 reference in value and gradient."""
    from taid.divergences import _AKL_TOP_K

    V = 4 * _AKL_TOP_K + 3
    student, teacher, labels = make_inputs((3, 7), V, seed=21)
    teacher[0] = 0.05 * teacher[0]  # near uniform: the head spans ~V/2 > _AKL_TOP_K tokens
    teacher[1, :, 5] += 9.0  # one token holds most of the mass
    teacher[2, ::2, 7] += 6.0
    student.requires_grad_(True)
    loss = TF.adaptive_kl(student, teacher, labels, mu=0.5, ignore_index=42, **IMPLS[impl])
    expected = reference("akl", student.double(), teacher, labels, {"mu": 0.5}, ignore_index=42)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    grad_out = torch.tensor(2.5)
    (got,) = torch.autograd.grad(loss, student, grad_out)
    (want,) = torch.autograd.grad(expected, student, grad_out.double())
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-6)


def test_cross_entropy_matches_torch_with_custom_ignore_index(impl):
    student, _, labels = make_inputs((3, 47), 123, seed=14)
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    ours = TF.cross_entropy(s1, labels, ignore_index=42, **IMPLS[impl])
    ref = torch.nn.functional.cross_entropy(
        s2.reshape(-1, 123), labels.reshape(-1), ignore_index=42
    )
    (2 * ours).backward()
    (2 * ref).backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(s1.grad, s2.grad)


@pytest.mark.parametrize("name", NAMES)
def test_one_batch_of_8_equals_8_batches_of_1(name, impl):
    """Token-weighted normalisation: summed losses over micro-batches divided by the tokens of
    the whole step reproduce the full-batch mean, loss and gradient (TRL's invariant)."""
    student, teacher, labels = make_inputs((8, 13), 45, seed=15, mask_frac=0.4)
    fn, params = PUBLIC[name]
    s_full = student.clone().requires_grad_(True)
    full = fn(s_full, teacher, labels, ignore_index=42, **params, **IMPLS[impl])
    full.backward()
    s_micro = student.clone().requires_grad_(True)
    n_total = (labels != 42).sum()
    total = 0.0
    for i in range(8):
        part = (
            fn(
                s_micro[i : i + 1],
                teacher[i : i + 1],
                labels[i : i + 1],
                ignore_index=42,
                reduction="sum",
                **params,
                **IMPLS[impl],
            )
            / n_total
        )
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), rel=1e-5)
    torch.testing.assert_close(s_micro.grad, s_full.grad, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------------
# Vocabulary widths
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_vocab_size_slices_padded_rows(name, impl):
    student, teacher, labels = make_inputs((3, 5), 64, seed=16)
    padded_student = torch.cat([student, torch.randn(3, 5, 7)], dim=-1)  # 71 rows
    padded_teacher = torch.cat([teacher, torch.randn(3, 5, 2)], dim=-1)  # 66 rows
    fn, params = PUBLIC[name]
    s = padded_student.clone().requires_grad_(True)
    out = fn(s, padded_teacher, labels, ignore_index=42, vocab_size=64, **params, **IMPLS[impl])
    out.backward()
    ref, g_ref = run_ours(
        name, student, teacher, labels, ignore_index=42, impl=impl, grad_scale=1.0
    )
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(s.grad[..., :64], g_ref)
    assert torch.all(s.grad[..., 64:] == 0)


def test_width_mismatch_without_vocab_size_names_both_and_the_fix():
    s, z = torch.randn(1, 151936), torch.randn(1, 152064)
    with pytest.raises(ValueError, match=r"151936.*152064.*vocab_size"):
        TF.taid_loss(s, z, t=0.5)


def test_vocab_size_larger_than_width_is_refused():
    with pytest.raises(ValueError, match="vocab_size=20"):
        TF.forward_kl(torch.randn(2, 10), torch.randn(2, 12), vocab_size=20)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------
def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 10\).*\(2, 4, 10\)"):
        TF.forward_kl(torch.randn(2, 3, 10), torch.randn(2, 4, 10))


def test_label_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match=r"labels shape \(2, 4\).*\(2, 3\)"):
        TF.forward_kl(torch.randn(2, 3, 10), torch.randn(2, 3, 10), torch.zeros(2, 4).long())


def test_float_labels_are_refused():
    with pytest.raises(TypeError, match="integer"):
        TF.forward_kl(torch.randn(2, 10), torch.randn(2, 10), torch.zeros(2))


@pytest.mark.parametrize("t", [-0.01, 1.01, float("nan")])
def test_t_outside_unit_interval_is_refused(t):
    with pytest.raises(ValueError, match="t must be in"):
        TF.taid_loss(torch.randn(2, 10), torch.randn(2, 10), t=t)


@pytest.mark.parametrize(
    "fn,kw",
    [
        (TF.jsd, {"beta": 0.0}),
        (TF.jsd, {"beta": 1.0}),
        (TF.skew_kl, {"alpha": 1.0}),
        (TF.adaptive_kl, {"mu": 0.0}),
    ],
)
def test_hyperparameters_out_of_range_are_refused(fn, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        fn(torch.randn(2, 10), torch.randn(2, 10), **kw)


def test_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction"):
        TF.forward_kl(torch.randn(2, 10), torch.randn(2, 10), reduction="batchmean")


def test_cross_entropy_label_outside_vocabulary_is_explained():
    with pytest.raises(ValueError, match=r"label 10 is outside the vocabulary \[0, 10\)"):
        TF.cross_entropy(torch.randn(2, 10), torch.tensor([3, 10]))


# ------------------------------------------------------------------------------------------
# A new divergence can start as its forward formula: autograd per chunk
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fused", [False, True])
def test_the_autograd_fallback_equals_the_analytic_gradient(name, fused, monkeypatch):
    student, teacher, labels = make_inputs((3, 11), 37, ignore_index=42, seed=5)

    def run():
        if not fused:
            return run_ours(name, student, teacher, labels, ignore_index=42, impl="chunked-7")
        g = torch.Generator().manual_seed(1)
        hidden = torch.randn(3, 11, 8, generator=g).requires_grad_(True)
        weight = torch.randn(37, 8, generator=g).requires_grad_(True)
        fn = getattr(TF, f"fused_linear_{DIVERGENCES[name].function}")
        out = fn(hidden, weight, teacher, labels, ignore_index=42, chunk_size=7, **PUBLIC[name][1])
        (2.0 * out).backward()
        return out, torch.cat([hidden.grad.reshape(-1), weight.grad.reshape(-1)])

    analytic_loss, analytic_grad = run()
    monkeypatch.setitem(DIVERGENCES, name, dataclasses.replace(DIVERGENCES[name], analytic=False))
    fallback_loss, fallback_grad = run()
    torch.testing.assert_close(fallback_loss, analytic_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fallback_grad, analytic_grad, rtol=1e-4, atol=1e-6)
    assert fallback_grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------
# Temperature: fixed or learned, every path equal to the reference
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_temperature_one_is_todays_loss(name, impl):
    student, teacher, labels = make_inputs((3, 11), 37, ignore_index=42, seed=11)
    plain, g_plain = run_ours(name, student, teacher, labels, ignore_index=42, impl=impl)
    fn, params = PUBLIC[name]
    s = student.clone().requires_grad_(True)
    out = fn(
        s,
        teacher,
        labels,
        ignore_index=42,
        temperature=1.0,
        temperature_scaling=True,
        **params,
        **IMPLS[impl],
    )
    (2.0 * out).backward()
    assert torch.equal(out, plain) and torch.equal(s.grad, g_plain)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scaling", [False, True])
def test_a_fixed_temperature_matches_the_reference(name, scaling, impl):
    student, teacher, labels = make_inputs((3, 11), 37, ignore_index=42, seed=12)
    fn, params = PUBLIC[name]
    s = student.clone().requires_grad_(True)
    out = fn(
        s,
        teacher,
        labels,
        ignore_index=42,
        temperature=2.5,
        temperature_scaling=scaling,
        **params,
        **IMPLS[impl],
    )
    (2.0 * out).backward()
    s64 = student.double().requires_grad_(True)
    ref = reference(
        name,
        s64,
        teacher,
        labels,
        params,
        ignore_index=42,
        temperature=2.5,
        temperature_scaling=scaling,
    )
    (2.0 * ref).backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_learned_temperature_gets_the_reference_gradient(name, reduction, impl):
    """A 0-d tensor temperature that requires grad (as CTKD learns it): the gradient w.r.t.
    it equals float64 autograd through the naive reference, with grad_output != 1."""
    student, teacher, labels = make_inputs((3, 11), 37, ignore_index=42, seed=13)
    fn, params = PUBLIC[name]
    weights = torch.linspace(0.5, 2.0, 33).reshape(3, 11)  # a different grad_output per row
    s = student.clone().requires_grad_(True)
    tau = torch.tensor(1.7, requires_grad=True)
    out = fn(
        s,
        teacher,
        labels,
        ignore_index=42,
        temperature=tau,
        temperature_scaling=True,
        reduction=reduction,
        **params,
        **IMPLS[impl],
    )
    (out * weights if reduction == "none" else 2.0 * out).sum().backward()
    s64 = student.double().requires_grad_(True)
    tau64 = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    ref = reference(
        name,
        s64,
        teacher,
        labels,
        params,
        ignore_index=42,
        reduction=reduction,
        temperature=tau64,
        temperature_scaling=True,
    )
    (ref * weights.double() if reduction == "none" else 2.0 * ref).sum().backward()
    torch.testing.assert_close(out.detach().double(), ref.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=2e-4, atol=1e-7)
    torch.testing.assert_close(tau.grad.double(), tau64.grad, rtol=2e-4, atol=1e-6)


def test_temperature_must_be_positive():
    s, z, labels = make_inputs((2, 3), 7)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            TF.forward_kl(s, z, labels, temperature=bad)


# ------------------------------------------------------------------------------------------
# Non-finite logits are caught where they first appear, before any gradient exists
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_are_named_by_side_before_backward(name, side, value, impl):
    student, teacher, labels = make_inputs((2, 7), 19, seed=14)
    labels[1, 3] = 5
    (student if side == "student" else teacher)[1, 3, 11] = value
    with pytest.raises(
        FloatingPointError,
        match=rf"the {side}'s logits contain NaN or \+inf "
        rf"at flattened position 10 \(vocabulary ids "
        rf"\[11\]\)",
    ):
        run_ours(name, student, teacher, labels, ignore_index=42, impl=impl)


def test_non_finite_logits_at_an_ignored_position_are_not_used(impl):
    student, teacher, labels = make_inputs((2, 7), 19, seed=14)
    labels[1, 3] = 42
    student[1, 3, 11] = float("nan")
    out, g = run_ours("fkl", student, teacher, labels, ignore_index=42, impl=impl)
    assert torch.isfinite(out) and torch.isfinite(g).all()
