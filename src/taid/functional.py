"""Pure math of TAID and the baseline divergences.

Every loss here follows one pattern:

1. :func:`prepare` checks shapes, slices both vocabularies to a shared width, upcasts to
   float32, replaces ``-inf`` vocabulary slots by a large finite negative number and keeps only
   the positions whose label is not ``ignore_index``.
2. A *per-token kernel* (one small function per divergence, registered in :data:`DIVERGENCES`)
   maps ``[n, V]`` student and teacher logits to ``[n]`` per-token losses. Kernels are plain,
   differentiable torch code; the teacher side never carries gradient.
3. :func:`reduce` turns per-token losses into ``"mean"`` (over valid tokens), ``"sum"`` or
   ``"none"`` (per position, 0 where masked).

Notation per position: ``z_s`` student logits, ``z_T`` teacher logits, ``q = softmax(z_s)``,
``p = softmax(z_T)``. All arithmetic is float32 whatever the input dtype.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")

# Stand-in for -inf logits. Large enough that exp() underflows to exactly 0 after any convex
# interpolation (TAID mixes two logits with weights summing to 1), small enough that sums and
# differences of two of them never overflow to -inf, which would turn 0 * inf into NaN.
MASKED_LOGIT = torch.finfo(torch.float32).min / 8

Kernel = Callable[..., Tensor]


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------
class Prepared(NamedTuple):
    """Flattened, validated inputs of a loss.

    Attributes:
        student: ``[n_valid, V']`` float32 student logits (keeps the graph to the input).
        teacher: ``[n_valid, V']`` float32 teacher logits, detached; ``None`` when not given.
        labels: ``[n_valid]`` labels of the valid positions; ``None`` when not given.
        mask: ``[N]`` bool, which of the ``N`` flattened positions are valid.
        shape: the leading shape ``logits.shape[:-1]`` (for ``reduction="none"``).
    """

    student: Tensor
    teacher: Tensor | None
    labels: Tensor | None
    mask: Tensor
    shape: torch.Size


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def resolve_vocab(student_width: int, teacher_width: int | None, vocab_size: int | None) -> int:
    """The vocabulary width both sides are sliced to.

    Checkpoints of one model family often pad the output layer differently (e.g. 151936 vs
    152064 rows). Those padding rows are sliced off, never zero-padded: a zero logit would put
    real probability on a row that means nothing.

    Raises:
        ValueError: widths differ and ``vocab_size`` is not given, or ``vocab_size`` is larger
            than a width.
    """
    widths = [student_width] if teacher_width is None else [student_width, teacher_width]
    if vocab_size is None:
        if teacher_width is not None and student_width != teacher_width:
            raise ValueError(
                f"student vocabulary width {student_width} != teacher vocabulary width "
                f"{teacher_width}. If both models share one tokenizer and the extra rows are "
                f"padding of the output layer, pass vocab_size=<the tokenizer's length> (at most "
                f"{min(widths)}) to slice both; if the tokenizers differ, logit distillation "
                f"between these models is not defined."
            )
        return student_width
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if vocab_size > min(widths):
        raise ValueError(
            f"vocab_size={vocab_size} exceeds the logits' width (student {student_width}"
            + ("" if teacher_width is None else f", teacher {teacher_width}")
            + "); it must be the shared tokenizer length, at most the smaller width."
        )
    return vocab_size


def _as_float_logits(x: Tensor, width: int) -> Tensor:
    if not x.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {x.dtype}")
    x = x[..., :width] if x.shape[-1] != width else x
    return x.float().clamp_min(MASKED_LOGIT)


def valid_mask(labels: Tensor | None, leading_shape: torch.Size, ignore_index: int,
               device: torch.device) -> Tensor:
    """``[N]`` bool mask of the positions that count (``labels != ignore_index``)."""
    if labels is None:
        return torch.ones(math.prod(leading_shape), dtype=torch.bool, device=device)
    if labels.shape != leading_shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the logits' shape without the "
            f"vocabulary dimension, {tuple(leading_shape)}. Labels are aligned with the logits: "
            f"position i predicts labels[i] (shift them before calling)."
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    return labels.reshape(-1) != ignore_index


def prepare(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None,
    *,
    ignore_index: int = -100,
    vocab_size: int | None = None,
) -> Prepared:
    """Validate, slice, upcast and mask the inputs of a loss.

    Args:
        student_logits: ``[..., V_s]`` student logits (any float dtype).
        teacher_logits: ``[..., V_T]`` teacher logits, or ``None`` (cross-entropy only).
        labels: ``[...]`` integer labels aligned with the logits, or ``None`` (all positions).
        ignore_index: label value of the positions to exclude.
        vocab_size: shared tokenizer length both widths are sliced to; required when
            ``V_s != V_T``.

    Returns:
        A :class:`Prepared` with only the valid rows, in float32.
    """
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have a vocabulary dimension, got a scalar")
    leading = student_logits.shape[:-1]
    teacher_width = None
    if teacher_logits is not None:
        if teacher_logits.shape[:-1] != leading:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher logits "
                f"{tuple(teacher_logits.shape)} must have the same shape except the last "
                f"(vocabulary) dimension"
            )
        teacher_width = teacher_logits.shape[-1]
    width = resolve_vocab(student_logits.shape[-1], teacher_width, vocab_size)
    mask = valid_mask(labels, leading, ignore_index, student_logits.device)

    student = _as_float_logits(student_logits, width).reshape(-1, width)[mask]
    teacher = None
    if teacher_logits is not None:
        teacher = _as_float_logits(teacher_logits.detach(), width).reshape(-1, width)[mask]
    flat_labels = None if labels is None else labels.reshape(-1)[mask]
    return Prepared(student, teacher, flat_labels, mask, leading)


def reduce(per_token: Tensor, mask: Tensor, shape: torch.Size, reduction: Reduction) -> Tensor:
    """Reduce ``[n_valid]`` per-token losses.

    ``"mean"`` divides the sum by the number of valid tokens (0 when there are none, never
    NaN); ``"sum"`` is for loops that divide by a global token count themselves; ``"none"``
    returns ``shape`` with 0 at masked positions.
    """
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / mask.sum().clamp_min(1)
    out = per_token.new_zeros(mask.shape[0])
    return out.masked_scatter(mask, per_token).reshape(shape)


# --------------------------------------------------------------------------------------------
# Per-token kernels: [n, V] float32 student and teacher logits -> [n] losses
# --------------------------------------------------------------------------------------------
def _kl(p: Tensor, log_p: Tensor, log_r: Tensor) -> Tensor:
    """sum_v p[v] * (log p[v] - log r[v]); p = 0 slots contribute exactly 0 (inputs finite)."""
    return (p * (log_p - log_r)).sum(-1)


def taid_per_token(student: Tensor, teacher: Tensor, *, t: float) -> Tensor:
    """KL(p_t || q) with p_t = softmax((1 - t) * stopgrad(z_s) + t * z_T).

    The gradient w.r.t. ``z_s`` is ``q - p_t``. Interpolation is in logit space: a probability
    mixture would be skew KL, a different method.
    """
    log_pt = torch.log_softmax((1.0 - t) * student.detach() + t * teacher, dim=-1)
    return _kl(log_pt.exp(), log_pt, torch.log_softmax(student, dim=-1))


def forward_kl_per_token(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(p || q)."""
    log_p = torch.log_softmax(teacher, dim=-1)
    return _kl(log_p.exp(), log_p, torch.log_softmax(student, dim=-1))


def reverse_kl_per_token(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(q || p)."""
    log_q = torch.log_softmax(student, dim=-1)
    return _kl(log_q.exp(), log_q, torch.log_softmax(teacher, dim=-1))


def tvd_per_token(student: Tensor, teacher: Tensor) -> Tensor:
    """0.5 * sum_v |p[v] - q[v]|."""
    return 0.5 * (torch.softmax(teacher, dim=-1) - torch.softmax(student, dim=-1)).abs().sum(-1)


def _log_mix(log_a: Tensor, weight_a: float, log_b: Tensor) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), formed in log space for stability."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def jsd_per_token(student: Tensor, teacher: Tensor, *, beta: float) -> Tensor:
    """Generalized JSD: beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta p + (1-beta) q."""
    log_p = torch.log_softmax(teacher, dim=-1)
    log_q = torch.log_softmax(student, dim=-1)
    log_m = _log_mix(log_p, beta, log_q)
    return beta * _kl(log_p.exp(), log_p, log_m) + (1.0 - beta) * _kl(log_q.exp(), log_q, log_m)


def skew_kl_per_token(student: Tensor, teacher: Tensor, *, alpha: float) -> Tensor:
    """Skew KL: KL(p || alpha * p + (1 - alpha) * q)."""
    log_p = torch.log_softmax(teacher, dim=-1)
    log_q = torch.log_softmax(student, dim=-1)
    return _kl(log_p.exp(), log_p, _log_mix(log_p, alpha, log_q))


def skew_reverse_kl_per_token(student: Tensor, teacher: Tensor, *, alpha: float) -> Tensor:
    """Skew reverse KL: KL(q || (1 - alpha) * p + alpha * q)."""
    log_p = torch.log_softmax(teacher, dim=-1)
    log_q = torch.log_softmax(student, dim=-1)
    return _kl(log_q.exp(), log_q, _log_mix(log_q, alpha, log_p))


def adaptive_kl_per_token(student: Tensor, teacher: Tensor, *, mu: float) -> Tensor:
    """Adaptive KL: head/tail-weighted sum of forward and reverse KL.

    The head is the smallest set of teacher tokens, taken in descending probability, whose
    cumulative mass reaches ``mu``. With ``g = |p - q|`` summed over head and tail,
    ``loss = g_head / (g_head + g_tail) * KL(p||q) + g_tail / (g_head + g_tail) * KL(q||p)``;
    the weights carry no gradient. The split is computed in sorted order and mapped back to
    vocabulary order (the reference code applied the sorted mask in vocabulary order).
    """
    log_p = torch.log_softmax(teacher, dim=-1)
    log_q = torch.log_softmax(student, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    with torch.no_grad():
        p_sorted, order = p.sort(dim=-1, descending=True)
        mass_before = p_sorted.cumsum(dim=-1) - p_sorted
        head = torch.empty_like(order, dtype=torch.bool).scatter_(-1, order, mass_before < mu)
        gap = (p - q).abs()
        g_head = (gap * head).sum(-1)
        g_total = gap.sum(-1)
        w_head = torch.where(g_total > 0, g_head / g_total.clamp_min(1e-30), 0.5)
    return w_head * _kl(p, log_p, log_q) + (1.0 - w_head) * _kl(q, log_q, log_p)


def cross_entropy_per_token(student: Tensor, labels: Tensor) -> Tensor:
    """-log q[label] for each valid position."""
    return F.cross_entropy(student, labels, reduction="none")


DIVERGENCES: dict[str, Kernel] = {
    "taid": taid_per_token,
    "fkl": forward_kl_per_token,
    "rkl": reverse_kl_per_token,
    "tvd": tvd_per_token,
    "jsd": jsd_per_token,
    "skl": skew_kl_per_token,
    "srkl": skew_reverse_kl_per_token,
    "akl": adaptive_kl_per_token,
}
"""Per-token kernel of every divergence, by registry name."""


def _check_unit(name: str, value: float, *, low_open: bool = False, high_open: bool = False) -> float:
    value = float(value)
    lo_ok = value > 0 if low_open else value >= 0
    hi_ok = value < 1 if high_open else value <= 1
    if not (lo_ok and hi_ok):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def check_params(divergence: str, params: dict[str, float]) -> dict[str, float]:
    """Validate a divergence's hyperparameters; returns them as floats."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {sorted(DIVERGENCES)}")
    expected = {name for name, p in inspect.signature(DIVERGENCES[divergence]).parameters.items()
                if p.kind is p.KEYWORD_ONLY}
    if set(params) != expected:
        raise ValueError(f"divergence {divergence!r} takes parameters {sorted(expected)}, "
                         f"got {sorted(params)}")
    checks = {
        "t": dict(),
        "beta": dict(low_open=True, high_open=True),
        "alpha": dict(high_open=True),
        "mu": dict(low_open=True),
    }
    return {k: _check_unit(k, v, **checks[k]) for k, v in params.items()}


# --------------------------------------------------------------------------------------------
# The one entry point every loss goes through
# --------------------------------------------------------------------------------------------
class LossTerms(NamedTuple):
    """What a training loop needs from one loss call.

    Attributes:
        distill: the reduced divergence (``None`` for cross-entropy only).
        ce: the reduced cross-entropy on the labels (``None`` unless requested).
        num_tokens: number of valid positions (int64 scalar), the denominator of ``"mean"``.
    """

    distill: Tensor | None
    ce: Tensor | None
    num_tokens: Tensor


def loss_terms(
    divergence: str | None,
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    vocab_size: int | None = None,
    with_ce: bool = False,
    **params: float,
) -> LossTerms:
    """Compute a divergence and, optionally, cross-entropy on the labels in one pass.

    Args:
        divergence: a key of :data:`DIVERGENCES`, or ``None`` for cross-entropy only.
        student_logits: ``[..., V_s]``.
        teacher_logits: ``[..., V_T]``; required when ``divergence`` is given.
        labels: ``[...]`` aligned with the logits; required for cross-entropy.
        ignore_index: label value that excludes a position.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        vocab_size: shared tokenizer length when the widths differ.
        with_ce: also return cross-entropy on the labels.
        **params: the divergence's hyperparameters (``t``, ``beta``, ``alpha``, ``mu``).
    """
    _check_reduction(reduction)
    if divergence is not None:
        params = check_params(divergence, params)
        if teacher_logits is None:
            raise ValueError(f"divergence {divergence!r} needs teacher_logits, got None")
    elif params:
        raise ValueError(f"cross-entropy takes no divergence parameters, got {sorted(params)}")
    want_ce = with_ce or divergence is None
    if want_ce and labels is None:
        raise ValueError("cross-entropy on the labels needs labels, got None")
    x = prepare(student_logits, teacher_logits if divergence else None, labels,
                ignore_index=ignore_index, vocab_size=vocab_size)

    distill = ce = None
    if divergence is not None:
        distill = reduce(DIVERGENCES[divergence](x.student, x.teacher, **params), x.mask, x.shape,
                         reduction)
    if want_ce:
        width = x.student.shape[-1]
        if x.labels.numel() and (x.labels.min() < 0 or x.labels.max() >= width):
            bad = x.labels[(x.labels < 0) | (x.labels >= width)][0].item()
            raise ValueError(
                f"label {bad} is outside the vocabulary [0, {width}) and is not ignore_index "
                f"({ignore_index}); check the tokenizer, the padding label and ignore_index"
            )
        ce = reduce(cross_entropy_per_token(x.student, x.labels), x.mask, x.shape, reduction)
    return LossTerms(distill, ce, x.mask.sum())


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------
def taid_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
              t: float, ignore_index: int = -100, reduction: Reduction = "mean",
              vocab_size: int | None = None) -> Tensor:
    """TAID: KL(p_t || q), p_t = softmax((1 - t) * stopgrad(z_s) + t * z_T).

    Args:
        student_logits: ``[..., V]`` student logits (gradient flows here only).
        teacher_logits: ``[..., V]`` teacher logits (never receives gradient).
        labels: ``[...]`` labels aligned with the logits (position i predicts ``labels[i]``);
            only used to mask ``ignore_index``. ``None`` means every position counts.
        t: interpolation coefficient in [0, 1]. ``t = 0`` gives 0; ``t = 1`` is forward KL.
        ignore_index: label value of excluded positions.
        reduction: ``"mean"`` over valid tokens, ``"sum"``, or ``"none"`` (shape ``[...]``,
            0 where masked).
        vocab_size: slice both widths to this shared tokenizer length (required if they differ).

    Returns:
        The reduced loss. Per token its gradient w.r.t. ``z_s`` is ``q - p_t``.
    """
    return loss_terms("taid", student_logits, teacher_logits, labels, t=t,
                      ignore_index=ignore_index, reduction=reduction, vocab_size=vocab_size).distill


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
               ignore_index: int = -100, reduction: Reduction = "mean",
               vocab_size: int | None = None) -> Tensor:
    """Forward KL(p || q); arguments as :func:`taid_loss`."""
    return loss_terms("fkl", student_logits, teacher_logits, labels, ignore_index=ignore_index,
                      reduction=reduction, vocab_size=vocab_size).distill


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
               ignore_index: int = -100, reduction: Reduction = "mean",
               vocab_size: int | None = None) -> Tensor:
    """Reverse KL(q || p); arguments as :func:`taid_loss`."""
    return loss_terms("rkl", student_logits, teacher_logits, labels, ignore_index=ignore_index,
                      reduction=reduction, vocab_size=vocab_size).distill


def tvd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
        ignore_index: int = -100, reduction: Reduction = "mean",
        vocab_size: int | None = None) -> Tensor:
    """Total variation distance 0.5 * sum |p - q|; arguments as :func:`taid_loss`."""
    return loss_terms("tvd", student_logits, teacher_logits, labels, ignore_index=ignore_index,
                      reduction=reduction, vocab_size=vocab_size).distill


def jsd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
        beta: float = 0.1, ignore_index: int = -100, reduction: Reduction = "mean",
        vocab_size: int | None = None) -> Tensor:
    """Generalized JSD with ``m = beta p + (1 - beta) q``, ``beta`` in (0, 1):
    ``beta * KL(p || m) + (1 - beta) * KL(q || m)``; arguments as :func:`taid_loss`."""
    return loss_terms("jsd", student_logits, teacher_logits, labels, beta=beta,
                      ignore_index=ignore_index, reduction=reduction, vocab_size=vocab_size).distill


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
            alpha: float = 0.1, ignore_index: int = -100, reduction: Reduction = "mean",
            vocab_size: int | None = None) -> Tensor:
    """Skew KL(p || alpha p + (1 - alpha) q), ``alpha`` in [0, 1); arguments as
    :func:`taid_loss`."""
    return loss_terms("skl", student_logits, teacher_logits, labels, alpha=alpha,
                      ignore_index=ignore_index, reduction=reduction, vocab_size=vocab_size).distill


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
                    *, alpha: float = 0.1, ignore_index: int = -100,
                    reduction: Reduction = "mean", vocab_size: int | None = None) -> Tensor:
    """Skew reverse KL(q || (1 - alpha) p + alpha q), ``alpha`` in [0, 1); arguments as
    :func:`taid_loss`."""
    return loss_terms("srkl", student_logits, teacher_logits, labels, alpha=alpha,
                      ignore_index=ignore_index, reduction=reduction, vocab_size=vocab_size).distill


def adaptive_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
                mu: float = 0.5, ignore_index: int = -100, reduction: Reduction = "mean",
                vocab_size: int | None = None) -> Tensor:
    """Adaptive KL (see :func:`adaptive_kl_per_token`), ``mu`` in (0, 1]; arguments as
    :func:`taid_loss`."""
    return loss_terms("akl", student_logits, teacher_logits, labels, mu=mu,
                      ignore_index=ignore_index, reduction=reduction, vocab_size=vocab_size).distill


def cross_entropy(student_logits: Tensor, labels: Tensor, *, ignore_index: int = -100,
                  reduction: Reduction = "mean", vocab_size: int | None = None) -> Tensor:
    """Cross-entropy -log q[label] on the labels (plain SFT), float32, same masking."""
    return loss_terms(None, student_logits, None, labels, ignore_index=ignore_index,
                      reduction=reduction, vocab_size=vocab_size).ce
