"""The one chunked mechanism: losses that never hold full-vocabulary temporaries.

The valid token rows are walked in chunks. For each chunk the kernel of
:mod:`taid.divergences` returns the per-token loss and its analytic gradient w.r.t. the student
logits, so the gradient is complete when ``forward`` returns; ``backward`` only scales it by
``grad_output``. Peak extra memory is the gradient buffer plus a few ``chunk x V`` float32
temporaries, instead of several ``N x V`` buffers for autograd through the whole batch.

Two autograd Functions share that loop:

- :func:`chunked_logits_loss`: the student's logits are given (``[N, V]``).
- :func:`fused_linear_loss`: the student's last hidden states and output-layer weight are given,
  and each chunk's logits are formed, used and dropped, so the full student logits never exist.

Where the teacher's rows come from is a :class:`TeacherSource`: dense logits, or hidden states
and an output layer (logits rebuilt chunk by chunk).

Both store the gradient during ``forward`` and scale it in place during ``backward``: the graph
can be backpropagated once (use the eager implementation for double backward).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from taid import divergences as D

# Chunk sizing: about 1/32 of the rows, so a handful of chunk x V float32 temporaries stay a
# small fraction of one N x V buffer, but at least 2^18 elements per chunk so that small inputs
# run in one chunk and per-chunk overhead stays negligible, and at most 2^23 (32 MiB) per
# temporary.
_MIN_CHUNK_ELEMENTS = 2**18
_MAX_CHUNK_ELEMENTS = 2**23
_CHUNKS_TARGET = 32


def default_chunk_size(num_rows: int, width: int) -> int:
    """Rows per chunk for ``num_rows`` tokens over a ``width``-word vocabulary."""
    elements = num_rows * width / _CHUNKS_TARGET
    elements = min(max(elements, _MIN_CHUNK_ELEMENTS), _MAX_CHUNK_ELEMENTS)
    return max(1, min(num_rows, int(elements // width)))


def finite_(x: Tensor) -> Tensor:
    """Float32 copy-or-self of freshly made logits with ``-inf`` replaced (in place)."""
    return x.float().clamp_min_(D.MASKED_LOGIT)


# --------------------------------------------------------------------------------------------
# Teacher sources
# --------------------------------------------------------------------------------------------
class TeacherSource(Protocol):
    """Where teacher logits come from, a chunk of flattened token rows at a time."""

    width: int
    """Vocabulary width the source can provide."""

    def rows(self, idx: Tensor, width: int) -> Tensor:
        """Finite float32 teacher logits ``[len(idx), width]`` of the rows ``idx``."""
        ...


@dataclass
class LogitsTeacher:
    """Teacher logits given in full, ``[N, V_T]`` (any float dtype; no gradient)."""

    logits: Tensor

    @property
    def width(self) -> int:
        return self.logits.shape[-1]

    def rows(self, idx: Tensor, width: int) -> Tensor:
        return finite_(self.logits[:, :width].index_select(0, idx))


@dataclass
class LinearTeacher:
    """Teacher hidden states ``[N, H_T]`` and output layer ``weight [V_T, H_T]`` (+ ``bias``);
    logits are formed chunk by chunk, exactly as the teacher's head would."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    @property
    def width(self) -> int:
        return self.weight.shape[0]

    def rows(self, idx: Tensor, width: int) -> Tensor:
        bias = None if self.bias is None else self.bias[:width]
        return finite_(F.linear(self.hidden.index_select(0, idx), self.weight[:width], bias))


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    """What is optimised: ``(1 - w) * CE + w * divergence`` (``divergence=None`` means CE)."""

    divergence: str | None
    params: dict[str, float] = field(default_factory=dict)
    distill_weight: float = 1.0


@dataclass
class ChunkStats:
    """Values gathered by the loop (float32, no gradient): the reduced ``loss`` and the
    per-valid-token ``distill`` and ``ce`` terms (``None`` when not computed)."""

    loss: Tensor
    distill: Tensor | None
    ce: Tensor | None


def _chunks(idx: Tensor, chunk_size: int) -> Iterator[tuple[int, Tensor]]:
    for start in range(0, idx.numel(), chunk_size):
        yield start, idx[start:start + chunk_size]


def run_chunks(idx: Tensor, chunk_size: int, student_rows: Any, teacher: TeacherSource | None,
               labels: Tensor | None, objective: Objective, width: int, grad_scale: float,
               consume_grad: Any) -> ChunkStats:
    """Walk the valid rows ``idx`` in chunks; hand each chunk's scaled gradient to
    ``consume_grad(start, rows, grad)`` and return the per-token values."""
    n = idx.numel()
    device = idx.device
    loss = torch.empty(n, dtype=torch.float32, device=device)
    w = objective.distill_weight
    distill = torch.empty_like(loss) if objective.divergence is not None else None
    ce = torch.empty_like(loss) if w < 1.0 else None
    for start, rows in _chunks(idx, chunk_size):
        s = student_rows(rows)
        z = teacher.rows(rows, width) if distill is not None else None
        lab = labels[start:start + rows.numel()] if labels is not None else None
        out = D.mixed(s, z, lab, divergence=objective.divergence, params=objective.params,
                      distill_weight=w, need_grad=True)
        end = start + rows.numel()
        loss[start:end] = out.loss
        if distill is not None:
            distill[start:end] = out.distill
        if ce is not None:
            ce[start:end] = out.ce
        grad = out.grad
        if grad_scale != 1.0:
            grad.mul_(grad_scale)
        consume_grad(start, rows, grad)
        del s, z, out, grad
    return ChunkStats(loss, distill, ce)


def _scale_(grads: list[Tensor | None], grad_output: Tensor, per_row: bool) -> None:
    for g in grads:
        if g is None:
            continue
        if per_row:
            g.mul_(grad_output.reshape(-1, *([1] * (g.dim() - 1))).to(g.dtype))
        elif not torch.equal(grad_output, torch.ones_like(grad_output)):
            g.mul_(grad_output.to(g.dtype))


class _ChunkedLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, student: Tensor, idx: Tensor, teacher: TeacherSource | None,
                labels: Tensor | None, objective: Objective, width: int, chunk_size: int,
                reduction: str) -> tuple[Tensor, Tensor, Tensor]:
        n_rows = student.shape[0]
        grad = torch.zeros_like(student)
        view = grad[:, :width]
        scale = 1.0 / max(idx.numel(), 1) if reduction == "mean" else 1.0

        def student_rows(rows: Tensor) -> Tensor:
            return finite_(student[:, :width].index_select(0, rows))

        def consume(start: int, rows: Tensor, g: Tensor) -> None:
            view.index_copy_(0, rows, g.to(view.dtype))

        stats = run_chunks(idx, chunk_size, student_rows, teacher, labels, objective, width,
                           scale, consume)
        out = reduce_rows(stats.loss, idx, n_rows, reduction)
        ctx.save_for_backward(grad)
        ctx.per_row = reduction == "none"
        ctx.used = False
        distill = stats.distill if stats.distill is not None else stats.loss.new_zeros(0)
        ce = stats.ce if stats.ce is not None else stats.loss.new_zeros(0)
        ctx.mark_non_differentiable(distill, ce)
        return out, distill, ce

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        if ctx.used:
            raise RuntimeError("the chunked loss can be backpropagated once; use "
                               "implementation='eager' for double backward or retain_graph")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        _scale_([grad], grad_out, ctx.per_row)
        return grad, None, None, None, None, None, None, None


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, idx: Tensor,
                teacher: TeacherSource | None, labels: Tensor | None, objective: Objective,
                width: int, chunk_size: int, reduction: str) -> tuple[Tensor, Tensor, Tensor]:
        w_rows = weight[:width]
        b_rows = None if bias is None else bias[:width]
        grad_h = torch.zeros_like(hidden)
        # accumulated over chunks: keep float32 whatever the weight dtype
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32,
                                                       device=bias.device)
        scale = 1.0 / max(idx.numel(), 1) if reduction == "mean" else 1.0
        chunk_hidden: dict[str, Tensor] = {}

        def student_rows(rows: Tensor) -> Tensor:
            h = hidden.index_select(0, rows)
            chunk_hidden["h"] = h
            return finite_(F.linear(h, w_rows, b_rows))

        def consume(start: int, rows: Tensor, g: Tensor) -> None:
            h = chunk_hidden.pop("h")
            g = g.to(weight.dtype)
            grad_h.index_copy_(0, rows, (g @ w_rows).to(grad_h.dtype))
            if weight.dtype == torch.float32:
                grad_w[:width].addmm_(g.t(), h)
            else:  # low-precision product, float32 accumulation across chunks
                grad_w[:width].add_(g.t() @ h)
            if grad_b is not None:
                grad_b[:width].add_(g.sum(0, dtype=torch.float32))

        stats = run_chunks(idx, chunk_size, student_rows, teacher, labels, objective, width,
                           scale, consume)
        out = reduce_rows(stats.loss, idx, hidden.shape[0], reduction)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.used = False
        distill = stats.distill if stats.distill is not None else stats.loss.new_zeros(0)
        ce = stats.ce if stats.ce is not None else stats.loss.new_zeros(0)
        ctx.mark_non_differentiable(distill, ce)
        return out, distill, ce

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        if ctx.used:
            raise RuntimeError("the fused loss can be backpropagated once")
        ctx.used = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        _scale_([grad_h, grad_w, grad_b], grad_out, per_row=False)
        grad_w = grad_w.to(ctx.weight_dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return (grad_h, grad_w, grad_b) + (None,) * 7


def reduce_rows(per_token: Tensor, idx: Tensor, n_rows: int, reduction: str) -> Tensor:
    """Reduce per-valid-token values: mean over valid tokens, sum, or per row (0 if masked)."""
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / max(idx.numel(), 1)
    return per_token.new_zeros(n_rows).index_copy_(0, idx, per_token)


def chunked_logits_loss(student: Tensor, idx: Tensor, teacher: TeacherSource | None,
                        labels: Tensor | None, objective: Objective, *, width: int,
                        chunk_size: int | None, reduction: str) -> tuple[Tensor, ChunkStats]:
    """Chunked loss on ``[N, V_s]`` student logits over the valid rows ``idx``.

    Args:
        student: flattened student logits ``[N, V_s]`` (gradient flows here).
        idx: int64 indices of the valid rows.
        teacher: the teacher rows, or ``None`` for cross-entropy only.
        labels: labels of the valid rows ``[len(idx)]`` (needed for cross-entropy).
        objective: divergence, its parameters and the CE mix.
        width: shared vocabulary width (columns beyond get zero gradient).
        chunk_size: rows per chunk (``None``: :func:`default_chunk_size`).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[N]``, 0 where masked).

    Returns:
        The reduced, differentiable loss and the per-valid-token values (no gradient).
    """
    chunk_size = chunk_size or default_chunk_size(max(idx.numel(), 1), width)
    out, distill, ce = _ChunkedLogits.apply(student, idx, teacher, labels, objective, width,
                                            chunk_size, reduction)
    return out, _stats(out, distill, ce, objective)


def fused_linear_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, idx: Tensor,
                      teacher: TeacherSource | None, labels: Tensor | None, objective: Objective,
                      *, width: int, chunk_size: int | None,
                      reduction: str) -> tuple[Tensor, ChunkStats]:
    """Chunked loss from student hidden states ``[N, H]`` and output layer ``weight [V_s, H]``
    (+ ``bias [V_s]``): ``logits = hidden @ weight.T + bias`` is formed one chunk at a time.
    Gradients flow to ``hidden``, ``weight`` and ``bias``. ``reduction`` is ``"mean"`` or
    ``"sum"``. Other arguments as :func:`chunked_logits_loss`.
    """
    chunk_size = chunk_size or default_chunk_size(max(idx.numel(), 1), width)
    out, distill, ce = _FusedLinear.apply(hidden, weight, bias, idx, teacher, labels, objective,
                                          width, chunk_size, reduction)
    return out, _stats(out, distill, ce, objective)


def _stats(out: Tensor, distill: Tensor, ce: Tensor, objective: Objective) -> ChunkStats:
    return ChunkStats(out.detach(), distill if objective.divergence is not None else None,
                      ce if objective.distill_weight < 1.0 else None)


__all__ = [
    "ChunkStats",
    "LinearTeacher",
    "LogitsTeacher",
    "Objective",
    "TeacherSource",
    "chunked_logits_loss",
    "default_chunk_size",
    "finite_",
    "fused_linear_loss",
    "reduce_rows",
]
