"""Per-token kernels: the math of TAID and of every baseline divergence.

A kernel maps float32 student logits ``s`` and teacher logits ``z`` of shape ``[n, V]`` (finite:
``-inf`` already replaced by :data:`MASKED_LOGIT`) to the per-token loss ``[n]`` and, when asked,
its gradient w.r.t. ``s`` ``[n, V]``::

    loss, grad = kernel(s, z, need_grad=..., **params)

- ``need_grad=False``: the loss is plain differentiable torch code (the eager path
  backpropagates through it with autograd; the teacher side never carries gradient).
- ``need_grad=True`` (called under ``torch.no_grad``): also returns the analytic gradient of
  ``loss.sum()``. ``s`` and ``z`` are then scratch copies owned by the kernel, which overwrites
  them in place (log-softmax, interpolation) to keep temporaries few (the chunked path).

Notation: ``q = softmax(s)``, ``p = softmax(z)``. For a loss written in terms of ``log q``
with ``h = dL/d(log q)``, the gradient w.r.t. the logits is ``h - q * sum(h)``.

Each divergence is described once, in :data:`DIVERGENCES` (a :class:`Divergence`: registry
name, public function name, kernel, hyperparameters with defaults and ranges). The functional
wrappers, the loss modules and their registry, config validation and the tests' grid are derived
from it. A kernel without an analytic gradient yet (``analytic=False``) takes ``need_grad`` but
only computes the loss; :func:`per_token` then differentiates it chunk by chunk with autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

# Stand-in for -inf logits. Large enough that exp() underflows to exactly 0 after any convex
# interpolation (TAID mixes two logits with weights summing to 1), small enough that sums of
# two or three of them never overflow to -inf, which would turn 0 * inf into NaN.
MASKED_LOGIT = torch.finfo(torch.float32).min / 8

# A per-token loss above this can only come from the stand-in on one side: a vocabulary slot
# masked (-inf) in one distribution where the other has probability, where the true value is
# +inf (forward KL with the student masked, reverse KL with the teacher masked, cross-entropy
# of a masked label). Real logits are far below 1e4 in magnitude, so finite losses stay far
# below it; the stand-in gives about 1e37.
INFINITE_LOSS = 1e30

KernelOut = tuple[Tensor, Tensor | None]
Kernel = Callable[..., KernelOut]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product ``sum_v a[:, v] * b[:, v]``."""
    return torch.linalg.vecdot(a, b)


def _through_log_softmax(h: Tensor, q: Tensor) -> Tensor:
    """Gradient w.r.t. logits from ``h = dL/d(log q)``: ``h - q * sum(h)`` (in place on h)."""
    return h.sub_(q * h.sum(-1, keepdim=True))


def _log_softmax_(x: Tensor) -> Tensor:
    """``log_softmax`` written over ``x`` itself (x must be a scratch tensor)."""
    return x.sub_(torch.logsumexp(x, dim=-1, keepdim=True))


def _log_probs(s: Tensor, z: Tensor, need_grad: bool) -> tuple[Tensor, Tensor]:
    """``(log q, log p)``: in place on the scratch inputs when ``need_grad``, else by autograd-
    safe out-of-place ops."""
    if need_grad:
        return _log_softmax_(s), _log_softmax_(z)
    return torch.log_softmax(s, dim=-1), torch.log_softmax(z, dim=-1)


def _log_mix(log_a: Tensor, weight_a: float, log_b: Tensor) -> Tensor:
    """``log(weight_a * a + (1 - weight_a) * b)``, formed in log space for stability."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def taid(s: Tensor, z: Tensor, *, t: float, need_grad: bool = False) -> KernelOut:
    """TAID: ``KL(p_t || q)`` with ``p_t = softmax((1 - t) * stopgrad(s) + t * z)``.

    That is forward KL towards the interpolated logits, so the gradient is ``q - p_t``.
    Interpolation is in logit space (a probability mixture would be skew KL, a different
    method).
    """
    if need_grad:  # z is scratch: z <- (1 - t) s + t z in place
        return forward_kl(s, z.lerp_(s, 1.0 - t), need_grad=True)
    return forward_kl(s, torch.lerp(s.detach(), z, t))


def forward_kl(s: Tensor, z: Tensor, *, need_grad: bool = False) -> KernelOut:
    """``KL(p || q)``; gradient ``q - p``."""
    log_q, log_p = _log_probs(s, z, need_grad)
    p = log_p.exp()
    loss = _dot(p, log_p.sub_(log_q) if need_grad else log_p - log_q)
    return loss, (log_q.exp_().sub_(p) if need_grad else None)


def reverse_kl(s: Tensor, z: Tensor, *, need_grad: bool = False) -> KernelOut:
    """``KL(q || p)``; gradient ``q * (log q - log p - KL)``."""
    log_q, log_p = _log_probs(s, z, need_grad)
    diff = log_q - log_p
    q = log_q.exp()
    loss = _dot(q, diff)
    return loss, (diff.sub_(loss[:, None]).mul_(q) if need_grad else None)


def tvd(s: Tensor, z: Tensor, *, need_grad: bool = False) -> KernelOut:
    """``0.5 * sum |p - q|``; ``h = 0.5 * q * sign(q - p)``."""
    log_q, log_p = _log_probs(s, z, need_grad)
    q = log_q.exp()
    diff = q - log_p.exp()
    loss = 0.5 * diff.abs().sum(-1)
    if not need_grad:
        return loss, None
    return loss, _through_log_softmax(diff.sign_().mul_(q).mul_(0.5), q)


def jsd(s: Tensor, z: Tensor, *, beta: float, need_grad: bool = False) -> KernelOut:
    """Generalized JSD ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1-beta) q``.

    ``dL/dq = (1 - beta) (log q - log m)``.
    """
    log_q, log_p = _log_probs(s, z, need_grad)
    log_m = _log_mix(log_p, beta, log_q)
    q = log_q.exp()
    q_term = log_q - log_m
    loss = beta * _dot(log_p.exp(), log_p - log_m) + (1.0 - beta) * _dot(q, q_term)
    if not need_grad:
        return loss, None
    return loss, _through_log_softmax(q_term.mul_(q).mul_(1.0 - beta), q)


def skew_kl(s: Tensor, z: Tensor, *, alpha: float, need_grad: bool = False) -> KernelOut:
    """Skew KL ``KL(p || m)``, ``m = alpha p + (1 - alpha) q``; ``h = -(1-alpha) p q / m``."""
    log_q, log_p = _log_probs(s, z, need_grad)
    log_m = _log_mix(log_p, alpha, log_q)
    loss = _dot(log_p.exp(), log_p - log_m)
    if not need_grad:
        return loss, None
    h = (log_p + log_q).sub_(log_m).exp_().mul_(alpha - 1.0)
    return loss, _through_log_softmax(h, log_q.exp_())


def skew_reverse_kl(s: Tensor, z: Tensor, *, alpha: float, need_grad: bool = False) -> KernelOut:
    """Skew reverse KL ``KL(q || m)``, ``m = (1 - alpha) p + alpha q``;
    ``h = q (log q - log m + 1) - alpha q^2 / m``."""
    log_q, log_p = _log_probs(s, z, need_grad)
    log_m = _log_mix(log_q, alpha, log_p)
    q = log_q.exp()
    q_term = log_q - log_m
    loss = _dot(q, q_term)
    if not need_grad:
        return loss, None
    h = q_term.add_(1.0).mul_(q)
    if alpha > 0.0:
        h.sub_((2.0 * log_q).sub_(log_m).exp_().mul_(alpha))
    return loss, _through_log_softmax(h, q)


#: Candidates for adaptive KL's head: the teacher's ``_AKL_TOP_K`` most likely tokens. A
#: language model's head (the tokens holding the first half of the mass) is a handful of
#: tokens: on SmolLM2-135M-Instruct's outputs over 4,026 positions of data/distill.jsonl, the
#: top 64 held half the mass on all but 0.25% of them. Those rows fall back to a full sort.
_AKL_TOP_K = 64


def _head_gap(p: Tensor, gap: Tensor, mu: float) -> Tensor:
    """``sum(gap)`` over each row's head: the smallest set of tokens, taken in descending
    ``p``, whose cumulative mass reaches ``mu`` (a token is in it when the mass before it is
    below ``mu``). ``p``, ``gap``: ``[N, V]``; returns ``[N]``.

    Sorting ``[N, V]`` was 85% of the loss's time on CPU at V = 49,152
    (benchmarks/objectives.py); the head lies within the top ``_AKL_TOP_K`` tokens whenever
    their mass reaches ``mu``, so only the other rows are sorted in full."""

    def in_order(p_desc: Tensor, order: Tensor, gap: Tensor) -> tuple[Tensor, Tensor]:
        # the gap summed over the head among tokens given in descending p, and the mass
        # before each of them
        before = p_desc.cumsum(dim=-1).sub_(p_desc)
        return _dot(gap.gather(-1, order), (before < mu).to(gap.dtype)), before

    top, idx = p.topk(min(_AKL_TOP_K, p.shape[-1]), dim=-1)  # descending, as a full sort
    head_gap, before = in_order(top, idx, gap)
    beyond = (before[:, -1] + top[:, -1]) < mu  # the head may extend past the candidates
    if bool(beyond.any()):
        rows = beyond.nonzero().squeeze(1)
        head_gap[rows] = in_order(*p[rows].sort(dim=-1, descending=True), gap[rows])[0]
    return head_gap


def adaptive_kl(s: Tensor, z: Tensor, *, mu: float, need_grad: bool = False) -> KernelOut:
    """Adaptive KL: ``w_head KL(p||q) + (1 - w_head) KL(q||p)``.

    The head is the smallest set of teacher tokens, taken in descending probability, whose
    cumulative mass reaches ``mu``; ``w_head = g_head / (g_head + g_tail)`` with
    ``g = |p - q|`` summed over head and tail, without gradient. The split is computed in sorted
    order and mapped back to vocabulary order (the reference code applied the sorted mask in
    vocabulary order); see :func:`_head_gap`.
    """
    log_q, log_p = _log_probs(s, z, need_grad)
    p, q = log_p.exp(), log_q.exp()
    with torch.no_grad():
        gap = (p - q).abs_()
        g_total = gap.sum(-1)
        w_head = torch.where(g_total > 0, _head_gap(p, gap, mu) / g_total.clamp_min(1e-30), 0.5)
        del gap
    diff = log_q - log_p  # log q - log p
    fkl = -_dot(p, diff)
    rkl = _dot(q, diff)
    loss = w_head * fkl + (1.0 - w_head) * rkl
    if not need_grad:
        return loss, None
    # w_head (q - p) + (1 - w_head) q (log q - log p - rkl)
    grad = diff.sub_(rkl[:, None]).mul_(q).mul_((1.0 - w_head)[:, None])
    return loss, grad.add_(q.sub_(p).mul_(w_head[:, None]))


def dkd(
    s: Tensor, z: Tensor, *, labels: Tensor, alpha: float, beta: float, need_grad: bool = False
) -> KernelOut:
    """Decoupled KD (Zhao et al., 2022), per target token ``y = labels``:
    ``alpha * KL(b_p || b_q) + beta * KL(p_hat || q_hat)``, where ``b = (mass of y, mass of
    the other tokens)`` (target-class KD) and ``p_hat``, ``q_hat`` are the distributions over
    the tokens other than ``y`` (non-target-class KD). Written in log space; the gradient comes
    from autograd per chunk (``analytic=False``)."""
    y = labels[:, None]
    lse_s, lse_z = torch.logsumexp(s, -1, keepdim=True), torch.logsumexp(z, -1, keepdim=True)
    s_rest = s.scatter(-1, y, MASKED_LOGIT)  # out of place: no gradient reaches s[y] here
    z_rest = z.scatter(-1, y, MASKED_LOGIT)
    lse_s_rest = torch.logsumexp(s_rest, -1, keepdim=True)
    lse_z_rest = torch.logsumexp(z_rest, -1, keepdim=True)
    # binary distributions (log p_y, log p_rest) and (log q_y, log q_rest)
    lp_y, lq_y = z.gather(-1, y) - lse_z, s.gather(-1, y) - lse_s
    lp_rest, lq_rest = lse_z_rest - lse_z, lse_s_rest - lse_s
    tckd = (lp_y.exp() * (lp_y - lq_y) + lp_rest.exp() * (lp_rest - lq_rest)).squeeze(-1)
    lp_hat, lq_hat = z_rest - lse_z_rest, s_rest - lse_s_rest
    nckd = _dot(lp_hat.exp(), lp_hat - lq_hat)
    return alpha * tckd + beta * nckd, None


def cross_entropy(s: Tensor, labels: Tensor, *, need_grad: bool = False) -> KernelOut:
    """``-log q[label]``; gradient ``q - onehot(label)``."""
    log_q = _log_softmax_(s) if need_grad else torch.log_softmax(s, dim=-1)
    loss = -log_q.gather(-1, labels[:, None]).squeeze(-1)
    if not need_grad:
        return loss, None
    grad = log_q.exp_()
    grad.scatter_add_(-1, labels[:, None], grad.new_full((labels.shape[0], 1), -1.0))
    return loss, grad


class Mixed(NamedTuple):
    """Per-token output of :func:`mixed`; ``grad_temperature`` is ``d loss / d tau`` per token
    when the temperature is a tensor that requires grad (a learned temperature)."""

    loss: Tensor
    distill: Tensor | None
    ce: Tensor | None
    grad: Tensor | None
    grad_temperature: Tensor | None = None


Temperature = float | Tensor
"""A fixed temperature, or a 0-d tensor (a learned one, whose gradient is wanted)."""


def learned(temperature: Temperature) -> bool:
    """Whether ``temperature`` is a tensor that wants its gradient."""
    return isinstance(temperature, Tensor) and temperature.requires_grad


def tempered(
    divergence: str,
    s: Tensor,
    z: Tensor,
    labels: Tensor | None,
    params: dict[str, float],
    *,
    temperature: Temperature = 1.0,
    temperature_scaling: bool = False,
    need_grad: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """A divergence on logits divided by ``tau = temperature``, times ``tau^2`` with
    ``temperature_scaling`` (so its gradient keeps the scale of ``tau = 1``).

    Returns the per-token loss ``[n]``, its gradient w.r.t. ``s`` ``[n, V]`` (``need_grad``)
    and, for a learned temperature with ``need_grad``, ``d loss_i / d tau`` ``[n]``. With
    ``need_grad`` the scratch inputs ``s`` and ``z`` are overwritten.
    """
    extra: dict[str, Any] = {"labels": labels} if DIVERGENCES[divergence].needs_labels else {}
    if not isinstance(temperature, Tensor) and temperature == 1.0:
        loss, grad = per_token(divergence, s, z, need_grad=need_grad, **extra, **params)
        return loss, grad, None
    if not need_grad:  # autograd sees the division (and a learned tau) directly
        tau = temperature
        loss, _ = per_token(divergence, s / tau, z / tau, need_grad=False, **extra, **params)
        return (loss * tau**2 if temperature_scaling else loss), None, None
    if isinstance(temperature, Tensor) and learned(temperature):
        return _learned_temperature(
            divergence, s, z, extra, params, temperature, temperature_scaling
        )
    tau = float(temperature)
    factor = tau**2 if temperature_scaling else 1.0
    loss, grad = per_token(divergence, s.div_(tau), z.div_(tau), need_grad=True, **extra, **params)
    assert grad is not None
    return loss * factor, grad.mul_(factor / tau), None


def _learned_temperature(
    divergence: str,
    s: Tensor,
    z: Tensor,
    extra: dict[str, Any],
    params: dict[str, float],
    temperature: Tensor,
    scaling: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Autograd through the kernel's loss on this chunk for the gradients w.r.t. the logits
    and the temperature; ``tau`` is repeated per row, so each row's own derivative comes out
    (needed when the reduction weights rows differently)."""
    spec = DIVERGENCES[divergence]
    with torch.enable_grad():
        leaf = s.detach().requires_grad_(True)
        tau = temperature.detach().reshape(1).expand(s.shape[0]).clone().requires_grad_(True)
        loss, _ = spec.kernel(
            leaf / tau[:, None], z.detach() / tau[:, None], need_grad=False, **extra, **params
        )
        if scaling:
            loss = loss * tau**2
        grad_s, grad_tau = torch.autograd.grad(loss.sum(), [leaf, tau])
    return loss.detach(), grad_s, grad_tau


def mixed(
    s: Tensor,
    z: Tensor | None,
    labels: Tensor | None,
    *,
    divergence: str | None,
    params: dict[str, float],
    distill_weight: float,
    need_grad: bool = False,
    temperature: Temperature = 1.0,
    temperature_scaling: bool = False,
) -> Mixed:
    """``(1 - w) * CE(labels) + w * divergence(s, z)`` per token, ``w = distill_weight``.

    ``divergence=None`` is cross-entropy alone. A term whose weight is 0 is not computed, except
    the divergence, which is always reported when named. The divergence sees the logits
    divided by ``temperature`` (see :func:`tempered`); the cross-entropy never does.
    """
    w = distill_weight
    if divergence is None or w < 1.0:
        if labels is None:
            raise ValueError("cross-entropy needs labels")
    if divergence is None:
        ce, g_ce = cross_entropy(s, labels, need_grad=need_grad)  # type: ignore[arg-type]
        return Mixed(ce, None, ce, g_ce)
    if z is None:
        raise ValueError(f"divergence {divergence!r} needs the teacher's logits")
    # kernels overwrite their scratch inputs: keep s intact for the cross-entropy
    s_div = s.clone() if (need_grad and w < 1.0) else s
    distill, g_distill, g_tau = tempered(
        divergence,
        s_div,
        z,
        labels,
        params,
        temperature=temperature,
        temperature_scaling=temperature_scaling,
        need_grad=need_grad,
    )
    if w == 1.0:
        return Mixed(distill, distill, None, g_distill, g_tau)
    ce, g_ce = cross_entropy(s, labels, need_grad=need_grad)  # type: ignore[arg-type]
    loss = w * distill + (1.0 - w) * ce
    grad = None
    if g_distill is not None and g_ce is not None:
        grad = g_distill.mul_(w).add_(g_ce, alpha=1.0 - w)
    return Mixed(loss, distill, ce, grad, None if g_tau is None else g_tau.mul_(w))


# --------------------------------------------------------------------------------------------
# Descriptions: the one place each divergence is defined
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """A divergence's hyperparameter: its range and its default (``None``: required)."""

    name: str
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    default: float | None = None
    doc: str = ""

    def interval(self) -> str:
        return (
            f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
            f"{')' if self.high_open else ']'}"
        )

    def check(self, value: float) -> float:
        """``value`` as a float, or ValueError naming the range."""
        value = float(value)
        lo_ok = value > self.low if self.low_open else value >= self.low
        hi_ok = value < self.high if self.high_open else value <= self.high
        if not (lo_ok and hi_ok):
            raise ValueError(f"{self.name} must be in {self.interval()}, got {value}")
        return value

    def example(self) -> float:
        """A valid value for tests and examples: the default, else the middle of the range."""
        if self.default is not None:
            return self.default
        hi = self.high if math.isfinite(self.high) else self.low + 2.0
        return 0.5 * (self.low + hi)


@dataclass(frozen=True)
class Divergence:
    """Everything the library derives a divergence's public surface from.

    Attributes:
        name: registry name (``loss.name`` in configs, ``build_loss(name)``).
        function: name of the public function in :mod:`taid.functional` (the fused one is
            ``fused_linear_<function>``).
        class_name: name of its ``nn.Module`` in :mod:`taid.losses`.
        formula: one line of math, used in docstrings.
        kernel: ``kernel(s, z, *, need_grad, **params) -> (loss [n], grad [n, V] | None)``.
        params: its hyperparameters, in order.
        analytic: whether ``kernel`` returns its gradient when ``need_grad``; if not, the
            gradient comes from autograd through the loss, per chunk (:func:`per_token`).
        needs_labels: the kernel also takes ``labels`` ``[n]`` (each row's target token).
    """

    name: str
    function: str
    class_name: str
    formula: str
    kernel: Kernel
    params: tuple[Param, ...] = ()
    analytic: bool = True
    needs_labels: bool = False

    def defaults(self) -> dict[str, float]:
        return {p.name: p.default for p in self.params if p.default is not None}

    def examples(self) -> dict[str, float]:
        return {p.name: p.example() for p in self.params}


_UNIT: dict[str, Any] = dict(low=0.0, high=1.0)
DIVERGENCES: dict[str, Divergence] = {
    d.name: d
    for d in [
        Divergence(
            "taid",
            "taid_loss",
            "TAIDLoss",
            "KL(p_t || q), p_t = softmax((1 - t) * stopgrad(z_s) + t * z_T)",
            taid,
            (
                Param(
                    "t",
                    **_UNIT,
                    doc="interpolation coefficient; 0 gives 0, 1 is forward "
                    "KL (TAIDLoss takes it from its scheduler)",
                ),
            ),
        ),
        Divergence("fkl", "forward_kl", "ForwardKLLoss", "KL(p || q)", forward_kl),
        Divergence("rkl", "reverse_kl", "ReverseKLLoss", "KL(q || p)", reverse_kl),
        Divergence("tvd", "tvd", "TVDLoss", "0.5 * sum |p - q|", tvd),
        Divergence(
            "jsd",
            "jsd",
            "JSDLoss",
            "beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q",
            jsd,
            (
                Param(
                    "beta",
                    **_UNIT,
                    low_open=True,
                    high_open=True,
                    default=0.1,
                    doc="teacher weight of the mixture m (GKD)",
                ),
            ),
        ),
        Divergence(
            "skl",
            "skew_kl",
            "SkewKLLoss",
            "KL(p || alpha p + (1 - alpha) q)",
            skew_kl,
            (
                Param(
                    "alpha",
                    **_UNIT,
                    high_open=True,
                    default=0.1,
                    doc="teacher weight of the skewed mixture (DistiLLM)",
                ),
            ),
        ),
        Divergence(
            "srkl",
            "skew_reverse_kl",
            "SkewReverseKLLoss",
            "KL(q || (1 - alpha) p + alpha q)",
            skew_reverse_kl,
            (
                Param(
                    "alpha",
                    **_UNIT,
                    high_open=True,
                    default=0.1,
                    doc="student weight of the skewed mixture (DistiLLM)",
                ),
            ),
        ),
        Divergence(
            "akl",
            "adaptive_kl",
            "AdaptiveKLLoss",
            "w_head KL(p || q) + (1 - w_head) KL(q || p), head = teacher mass mu",
            adaptive_kl,
            (Param("mu", **_UNIT, low_open=True, default=0.5, doc="teacher mass of the head"),),
        ),
        Divergence(
            "dkd",
            "dkd",
            "DKDLoss",
            "alpha KL(b_p || b_q) + beta KL(p_hat || q_hat), b = (mass of the target, the rest)",
            dkd,
            (
                Param(
                    "alpha",
                    low=0.0,
                    high=math.inf,
                    default=1.0,
                    doc="weight of target-class KD (TCKD)",
                ),
                Param(
                    "beta",
                    low=0.0,
                    high=math.inf,
                    default=0.5,
                    doc="weight of non-target-class KD (NCKD); the DKD paper uses 0.5 on "
                    "ImageNet, 8 on CIFAR-100",
                ),
            ),
            analytic=False,
            needs_labels=True,
        ),
    ]
}
"""Every divergence by registry name; adding one is a kernel above and an entry here."""


def check_params(divergence: str, params: dict[str, float]) -> dict[str, float]:
    """Validate a divergence's hyperparameters (names and ranges); returns them as floats.

    Raises:
        ValueError: unknown divergence, missing or extra parameter, or a value out of range.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {sorted(DIVERGENCES)}")
    spec = DIVERGENCES[divergence]
    expected = {p.name for p in spec.params}
    if set(params) != expected:
        raise ValueError(
            f"divergence {divergence!r} takes parameters {sorted(expected)}, got {sorted(params)}"
        )
    return {p.name: p.check(params[p.name]) for p in spec.params}


def per_token(
    divergence: str, s: Tensor, z: Tensor, *, need_grad: bool = False, **params: Any
) -> KernelOut:
    """A divergence's per-token loss ``[n]`` and, with ``need_grad``, its gradient w.r.t.
    ``s`` ``[n, V]``: the kernel's own, or (``analytic=False``) autograd through the kernel's
    loss on this chunk alone, so memory stays that of one chunk."""
    spec = DIVERGENCES[divergence]
    if not need_grad or spec.analytic:
        return spec.kernel(s, z, need_grad=need_grad, **params)
    with torch.enable_grad():
        leaf = s.detach().requires_grad_(True)
        loss, _ = spec.kernel(leaf, z.detach(), need_grad=False, **params)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad
