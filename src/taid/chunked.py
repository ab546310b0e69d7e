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

Where the teacher's rows come from is a :class:`taid.sources.TeacherSource` (dense logits,
hidden states and an output layer, top-k log-probabilities, cache rows).

Both store the gradient during ``forward`` and scale it in place during ``backward``: the graph
can be backpropagated once (use the eager implementation for double backward).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from taid import divergences as D
from taid.sources import Rows, TeacherSource, finite, lowered, raise_bad_loss, take

# Chunk sizing. On CPU the kernels are memory-bound: a chunk whose float32 temporaries fit in
# L2 (~2 MiB each) runs fastest (measured with benchmarks/loss_memory.py). On GPU per-chunk
# launch overhead dominates small chunks, so use about 1/32 of the rows, between 2^22 and 2^25
# elements: a few chunk temporaries stay a small fraction of one N x V buffer.
_CPU_CHUNK_ELEMENTS = 2**19
_GPU_CHUNK_ELEMENTS = (2**22, 2**25)
_GPU_CHUNKS_TARGET = 32


# The fused path multiplies each chunk of hidden states by the whole output layer: below about
# 128 rows the matmuls lose most of their efficiency and dominate the step (measured: 16-row
# chunks were 2.3-2.8 x slower than 128-row chunks on CPU).
FUSED_MIN_ROWS = 128


def default_chunk_size(
    num_rows: int, width: int, device: torch.device | str = "cpu", min_rows: int = 1
) -> int:
    """Rows per chunk for ``num_rows`` tokens over a ``width``-word vocabulary on ``device``,
    at least ``min_rows`` (and at most ``num_rows``)."""
    elements: float
    if torch.device(device).type == "cpu":
        elements = _CPU_CHUNK_ELEMENTS
    else:
        lo, hi = _GPU_CHUNK_ELEMENTS
        elements = min(max(num_rows * width / _GPU_CHUNKS_TARGET, lo), hi)
    return max(1, min(num_rows, max(min_rows, int(elements // width))))


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    """What is optimised: ``(1 - w) * CE + w * divergence`` (``divergence=None`` means CE)."""

    divergence: str | None
    params: dict[str, float] = field(default_factory=dict)
    distill_weight: float = 1.0
    temperature: D.Temperature = 1.0
    """The divergence's temperature: a number, or a 0-d tensor that is learned."""
    temperature_scaling: bool = False

    def learned_temperature(self) -> Tensor | None:
        """The temperature tensor when its gradient is wanted, else None."""
        t = self.temperature
        return t if isinstance(t, Tensor) and D.learned(t) else None


def valid_chunks(labels: Tensor, width: int, ignore_index: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The valid positions of ``labels`` (any shape, flattened), chunk by chunk: each chunk's
    row indices ``[n]`` and their labels ``[n]``, sized by :func:`default_chunk_size` for a
    ``width``-word vocabulary, for loops that form each chunk's ``[n, width]`` rows once."""
    flat = labels.reshape(-1)
    idx = (flat != ignore_index).nonzero().squeeze(1)
    chunk = default_chunk_size(max(idx.numel(), 1), width, labels.device)
    for start in range(0, idx.numel(), chunk):
        rows = idx[start : start + chunk]
        yield rows, flat.index_select(0, rows)


@dataclass
class ChunkStats:
    """Values gathered by the loop (float32, no gradient): the reduced ``loss`` and the
    per-valid-token ``distill`` and ``ce`` terms (``None`` when not computed)."""

    loss: Tensor
    distill: Tensor | None
    ce: Tensor | None
    grad_temperature: Tensor | None = None
    """Per valid token, ``d loss / d tau`` times the reduction's scale (learned tau only)."""


def _chunks(idx: Tensor, n_rows: int, chunk_size: int) -> Iterator[tuple[int, Rows]]:
    all_valid = idx.numel() == n_rows  # then idx is 0..n_rows-1
    for start in range(0, idx.numel(), chunk_size):
        end = min(start + chunk_size, idx.numel())
        yield start, slice(start, end) if all_valid else idx[start:end]


def _count(rows: Rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


def run_chunks(
    idx: Tensor,
    n_rows: int,
    chunk_size: int,
    student_rows: Any,
    teacher: TeacherSource | None,
    labels: Tensor | None,
    objective: Objective,
    width: int,
    grad_scale: float,
    consume_grad: Any,
) -> ChunkStats:
    """Walk the valid rows ``idx`` (of ``n_rows``) in chunks; hand each chunk's gradient, times
    ``grad_scale``, to ``consume_grad(rows, grad, grad_scale)`` and return the per-token
    values."""
    n = idx.numel()
    device = idx.device
    loss = torch.empty(n, dtype=torch.float32, device=device)
    w = objective.distill_weight
    distill = torch.empty_like(loss) if objective.divergence is not None else None
    ce = torch.empty_like(loss) if w < 1.0 else None
    learned = objective.learned_temperature() is not None and distill is not None
    grad_temperature = torch.zeros_like(loss) if learned else None
    for start, rows in _chunks(idx, n_rows, chunk_size):
        end = start + _count(rows)
        s = student_rows(rows)
        z = teacher.rows(rows, width) if teacher is not None and distill is not None else None
        lab = labels[start:end] if labels is not None else None
        out = D.mixed(
            s,
            z,
            lab,
            divergence=objective.divergence,
            params=objective.params,
            distill_weight=w,
            need_grad=True,
            temperature=objective.temperature,
            temperature_scaling=objective.temperature_scaling,
        )
        loss[start:end] = out.loss
        if grad_temperature is not None and out.grad_temperature is not None:
            grad_temperature[start:end] = out.grad_temperature * grad_scale
        if distill is not None and out.distill is not None:
            distill[start:end] = out.distill
        if ce is not None and out.ce is not None:
            ce[start:end] = out.ce
        consume_grad(rows, out.grad, grad_scale)
        del s, z, out
    # One check (one device sync) per call, before any gradient is used: NaN, +inf, or a
    # value only a one-sided mask produces. The reason is recomputed only on failure.
    if n and not bool((loss <= D.INFINITE_LOSS).all()):
        first = int((~(loss <= D.INFINITE_LOSS)).nonzero()[0])
        row = idx[first : first + 1]
        raise_bad_loss(
            student_rows(row)[0],
            teacher.rows(row, width)[0] if teacher is not None and distill is not None else None,
            int(labels[first]) if labels is not None and ce is not None else None,
            objective.divergence,
            int(row[0]),
        )
    return ChunkStats(loss, distill, ce, grad_temperature)


def _empty_grad(like: Tensor, idx: Tensor, width: int) -> Tensor:
    """Gradient buffer shaped like ``like``; only what no chunk writes is zeroed."""
    if idx.numel() < like.shape[0]:
        return torch.zeros_like(like)
    grad = torch.empty_like(like)
    if width < like.shape[1]:
        grad[:, width:].zero_()
    return grad


def _write_rows(dest: Tensor, rows: Rows, values: Tensor) -> None:
    """``dest[rows] = values`` in one pass (a slice is written in place)."""
    if isinstance(rows, slice):
        dest[rows].copy_(values)
    else:
        dest.index_copy_(0, rows, values.to(dest.dtype))


def _scale_(grads: list[Tensor | None], grad_output: Tensor, per_row: bool) -> None:
    for g in grads:
        if g is None:
            continue
        if per_row:
            g.mul_(grad_output.reshape(-1, *([1] * (g.dim() - 1))).to(g.dtype))
        elif not torch.equal(grad_output, torch.ones_like(grad_output)):
            g.mul_(grad_output.to(g.dtype))


def _finish_forward(
    ctx: Any, stats: ChunkStats, idx: Tensor, n_rows: int, reduction: str
) -> tuple[Tensor, Tensor, Tensor]:
    """The Functions' outputs: the reduced loss, and the per-token parts without gradient."""
    ctx.used = False
    empty = stats.loss.new_zeros(0)
    distill = stats.distill if stats.distill is not None else empty
    ce = stats.ce if stats.ce is not None else empty
    ctx.mark_non_differentiable(distill, ce)
    return reduce_rows(stats.loss, idx, n_rows, reduction), distill, ce


def _backward_once(ctx: Any) -> None:
    """The stored gradients are scaled in place: a second backward would be wrong."""
    if ctx.used:
        raise RuntimeError(
            "the chunked loss can be backpropagated once; use "
            "implementation='eager' for double backward or retain_graph"
        )
    ctx.used = True


class _ChunkedLogits(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        student: Tensor,
        idx: Tensor,
        teacher: TeacherSource | None,
        labels: Tensor | None,
        objective: Objective,
        width: int,
        chunk_size: int,
        reduction: str,
        temperature: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n_rows = student.shape[0]
        grad = _empty_grad(student, idx, width)
        view = grad[:, :width]
        scale = 1.0 / max(idx.numel(), 1) if reduction == "mean" else 1.0

        def student_rows(rows: Rows) -> Tensor:
            return finite(take(student[:, :width], rows), fresh=not isinstance(rows, slice))

        def consume(rows: Rows, g: Tensor, scale: float) -> None:
            if isinstance(rows, slice) and scale != 1.0:
                torch.mul(g, scale, out=view[rows])  # scale and store in one pass
            else:
                _write_rows(view, rows, g.mul_(scale) if scale != 1.0 else g)

        stats = run_chunks(
            idx, n_rows, chunk_size, student_rows, teacher, labels, objective, width, scale, consume
        )
        ctx.save_for_backward(grad)
        ctx.per_row = reduction == "none"
        _keep_temperature_grad(ctx, stats, idx, temperature)
        return _finish_forward(ctx, stats, idx, n_rows, reduction)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        _backward_once(ctx)
        (grad,) = ctx.saved_tensors
        grad_tau = _temperature_grad(ctx, grad_out)
        _scale_([grad], grad_out, ctx.per_row)
        return grad, None, None, None, None, None, None, None, grad_tau


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        idx: Tensor,
        teacher: TeacherSource | None,
        labels: Tensor | None,
        objective: Objective,
        width: int,
        chunk_size: int,
        reduction: str,
        temperature: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # under autocast, the output layer cast once (not once per chunk) for the logits and
        # the hidden-state gradient; a float32 weight's gradient still accumulates in place in
        # float32 (a low-precision product per chunk plus an add costs more on CPU)
        w_rows = lowered(weight[:width])
        b_rows = None if bias is None else lowered(bias[:width])
        grad_h = _empty_grad(hidden, idx, hidden.shape[1])
        # accumulated over chunks: keep float32 whatever the weight dtype
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = (
            None
            if bias is None
            else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        )
        scale = 1.0 / max(idx.numel(), 1) if reduction == "mean" else 1.0
        chunk_hidden: dict[str, Tensor] = {}

        def student_rows(rows: Rows) -> Tensor:
            h = take(hidden, rows)
            chunk_hidden["h"] = h
            return finite(F.linear(h, w_rows, b_rows), fresh=True)

        def consume(rows: Rows, g: Tensor, scale: float) -> None:
            h = chunk_hidden.pop("h")
            if scale != 1.0:
                g.mul_(scale)
            _write_rows(grad_h, rows, g.to(w_rows.dtype) @ w_rows)
            if weight.dtype == torch.float32:
                grad_w[:width].addmm_(g.float().t(), h.float())
            else:  # low-precision product, float32 accumulation across chunks
                g = g.to(weight.dtype)
                grad_w[:width].add_(g.t() @ h)
            if grad_b is not None:
                grad_b[:width].add_(g.sum(0, dtype=torch.float32))

        stats = run_chunks(
            idx,
            hidden.shape[0],
            chunk_size,
            student_rows,
            teacher,
            labels,
            objective,
            width,
            scale,
            consume,
        )
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.per_row = False
        _keep_temperature_grad(ctx, stats, idx, temperature)
        return _finish_forward(ctx, stats, idx, hidden.shape[0], reduction)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        _backward_once(ctx)
        grad_h, grad_w, grad_b = ctx.saved_tensors
        grad_tau = _temperature_grad(ctx, grad_out)
        _scale_([grad_h, grad_w, grad_b], grad_out, per_row=False)
        grad_w = grad_w.to(ctx.weight_dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return (grad_h, grad_w, grad_b) + (None,) * 7 + (grad_tau,)


def _keep_temperature_grad(
    ctx: Any, stats: ChunkStats, idx: Tensor, temperature: Tensor | None
) -> None:
    """Keep what backward needs for a learned temperature's gradient."""
    ctx.grad_temperature = stats.grad_temperature if temperature is not None else None
    ctx.temperature_like = temperature
    ctx.idx = idx


def _temperature_grad(ctx: Any, grad_out: Tensor) -> Tensor | None:
    """``d loss / d tau`` times ``grad_out`` (per valid row for reduction ``"none"``)."""
    per_token = ctx.grad_temperature
    if per_token is None:
        return None
    if ctx.per_row:
        total = (grad_out.reshape(-1).index_select(0, ctx.idx).float() * per_token).sum()
    else:
        total = per_token.sum() * grad_out.float()
    like = ctx.temperature_like
    return total.reshape(like.shape).to(like.dtype)


def reduce_rows(per_token: Tensor, idx: Tensor, n_rows: int, reduction: str) -> Tensor:
    """Reduce per-valid-token values: mean over valid tokens, sum, or per row (0 if masked)."""
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / max(idx.numel(), 1)
    return per_token.new_zeros(n_rows).index_copy_(0, idx, per_token)


def chunked_logits_loss(
    student: Tensor,
    idx: Tensor,
    teacher: TeacherSource | None,
    labels: Tensor | None,
    objective: Objective,
    *,
    width: int,
    chunk_size: int | None,
    reduction: str,
) -> tuple[Tensor, ChunkStats]:
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
    chunk_size = chunk_size or default_chunk_size(max(idx.numel(), 1), width, student.device)
    out, distill, ce = _ChunkedLogits.apply(
        student,
        idx,
        teacher,
        labels,
        objective,
        width,
        chunk_size,
        reduction,
        objective.learned_temperature(),
    )
    return out, _stats(out, distill, ce, objective)


def fused_linear_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    idx: Tensor,
    teacher: TeacherSource | None,
    labels: Tensor | None,
    objective: Objective,
    *,
    width: int,
    chunk_size: int | None,
    reduction: str,
) -> tuple[Tensor, ChunkStats]:
    """Chunked loss from student hidden states ``[N, H]`` and output layer ``weight [V_s, H]``
    (+ ``bias [V_s]``): ``logits = hidden @ weight.T + bias`` is formed one chunk at a time.
    Gradients flow to ``hidden``, ``weight`` and ``bias``. ``reduction`` is ``"mean"`` or
    ``"sum"``. Other arguments as :func:`chunked_logits_loss`.
    """
    chunk_size = chunk_size or default_chunk_size(
        max(idx.numel(), 1), width, hidden.device, min_rows=FUSED_MIN_ROWS
    )
    out, distill, ce = _FusedLinear.apply(
        hidden,
        weight,
        bias,
        idx,
        teacher,
        labels,
        objective,
        width,
        chunk_size,
        reduction,
        objective.learned_temperature(),
    )
    return out, _stats(out, distill, ce, objective)


def _stats(out: Tensor, distill: Tensor, ce: Tensor, objective: Objective) -> ChunkStats:
    return ChunkStats(
        out.detach(),
        distill if objective.divergence is not None else None,
        ce if objective.distill_weight < 1.0 else None,
    )


__all__ = [
    "ChunkStats",
    "Objective",
    "chunked_logits_loss",
    "default_chunk_size",
    "fused_linear_loss",
    "reduce_rows",
    "valid_chunks",
]
