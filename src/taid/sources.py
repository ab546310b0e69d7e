"""Every source of teacher logit rows, and the builders that make one from what a caller has.

A :class:`TeacherSource` answers "the teacher's logits for these flattened token rows", a chunk
at a time, so that the chunked losses never need the teacher's full ``N x V`` logits:

- :class:`LogitsTeacher`: dense logits ``[N, V]`` (:func:`from_logits`).
- :class:`LinearTeacher`: last hidden states ``[N, H]`` and the output layer; logits are formed
  chunk by chunk (:func:`from_hidden`, :func:`from_model`).
- :class:`TopKTeacher`: the k largest log-probabilities per token (a top-k cache).
- :class:`ValidRowsTeacher`: rows stored for the valid positions only (a teacher cache).

Public ``teacher`` arguments accept :data:`TeacherLike`: a tensor of logits (or hidden states
with an output layer), or any source. This module imports neither the trainer nor the cache
format; :mod:`taid.cache` stores and reads rows and builds its sources here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from taid import divergences as D

Rows = Tensor | slice
"""A chunk of flattened token rows: a slice when every row is valid (no copy needed to take
it), else the int64 indices of the valid rows."""


def take(x: Tensor, rows: Rows) -> Tensor:
    """Rows of a 2-D tensor: a view for a slice, a copy for indices."""
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def finite(x: Tensor, *, fresh: bool) -> Tensor:
    """Float32 logits with ``-inf`` replaced by :data:`~taid.divergences.MASKED_LOGIT`, in one
    pass. ``fresh`` says ``x`` is a temporary of ours that may be overwritten."""
    y = x.float()
    if y is x and not fresh:
        return torch.clamp_min(x, D.MASKED_LOGIT)
    return y.clamp_min_(D.MASKED_LOGIT)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type, or None when autocast is off there."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def lowered(x: Tensor) -> Tensor:
    """``x`` cast once to the active autocast dtype (unchanged when autocast is off or ``x`` is
    not float32). The chunk loops multiply every chunk by the same output layer: autocast would
    cast the layer again for every chunk (it caches casts of leaf parameters only, and a row
    slice is not one), and on CPU that cast costs as much as the product itself."""
    dtype = autocast_dtype(x.device)
    return x if dtype is None or x.dtype != torch.float32 else x.to(dtype)


# --------------------------------------------------------------------------------------------
# Teacher sources
# --------------------------------------------------------------------------------------------
@runtime_checkable
class TeacherSource(Protocol):
    """Where teacher logits come from, a chunk of flattened token rows at a time."""

    @property
    def width(self) -> int:
        """Vocabulary width the source can provide."""
        ...

    @property
    def num_rows(self) -> int:
        """Number of flattened token positions it covers."""
        ...

    def rows(self, rows: Rows, width: int) -> Tensor:
        """Finite float32 teacher logits ``[n, width]`` of ``rows`` (see :func:`finite`), in a
        fresh tensor: the kernels overwrite it."""
        ...


@dataclass
class LogitsTeacher:
    """Teacher logits given in full, ``[N, V_T]`` (any float dtype; no gradient)."""

    logits: Tensor

    @property
    def width(self) -> int:
        return self.logits.shape[-1]

    @property
    def num_rows(self) -> int:
        return self.logits.shape[0]

    def rows(self, rows: Rows, width: int) -> Tensor:
        return finite(take(self.logits[:, :width], rows), fresh=not isinstance(rows, slice))


@dataclass
class LinearTeacher:
    """Teacher hidden states ``[N, H_T]`` and output layer ``weight [V_T, H_T]`` (+ ``bias``);
    logits are formed chunk by chunk, exactly as the teacher's head would."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    _head: tuple[int, torch.dtype | None, Tensor, Tensor | None] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def width(self) -> int:
        return self.weight.shape[0]

    @property
    def num_rows(self) -> int:
        return self.hidden.shape[0]

    def rows(self, rows: Rows, width: int) -> Tensor:
        weight, bias = self._output_layer(width)
        return finite(F.linear(take(self.hidden, rows), weight, bias), fresh=True)

    def _output_layer(self, width: int) -> tuple[Tensor, Tensor | None]:
        """The first ``width`` rows of the output layer, cast to the autocast dtype once per
        source rather than once per chunk (see :func:`lowered`)."""
        dtype = autocast_dtype(self.weight.device)
        if self._head is None or self._head[:2] != (width, dtype):
            bias = None if self.bias is None else lowered(self.bias[:width])
            self._head = (width, dtype, lowered(self.weight[:width]), bias)
        return self._head[2], self._head[3]


@dataclass
class TopKTeacher:
    """A teacher known by its k largest log-probabilities per token (e.g. from a cache).

    Row ``i`` of the full distribution is rebuilt as: the stored ``log_probs[i]`` at
    ``ids[i]``, and the remaining mass ``1 - sum(exp(log_probs[i]))`` spread evenly over the
    other ``vocab_size - k`` ids. The result is a normalised log-distribution with exact top-k
    entries, used as the teacher's logits (a softmax of log-probabilities is themselves).

    Args:
        log_probs: ``[N, k]`` teacher log-probabilities (any float dtype), one row per flattened
            position of the student's logits.
        ids: ``[N, k]`` their token ids (any integer dtype).
        vocab_size: ``V``, the width of the distribution.
    """

    log_probs: Tensor
    ids: Tensor
    vocab_size: int

    def __post_init__(self) -> None:
        if self.log_probs.shape != self.ids.shape or self.log_probs.dim() != 2:
            raise ValueError(
                f"log_probs {tuple(self.log_probs.shape)} and ids "
                f"{tuple(self.ids.shape)} must both be [N, k]"
            )
        if self.ids.is_floating_point():
            raise TypeError(f"ids must be integers, got {self.ids.dtype}")
        if not 0 < self.log_probs.shape[1] <= self.vocab_size:
            raise ValueError(
                f"k = {self.log_probs.shape[1]} must be in [1, vocab_size = {self.vocab_size}]"
            )

    @property
    def width(self) -> int:
        return self.vocab_size

    @property
    def num_rows(self) -> int:
        return self.log_probs.shape[0]

    def rows(self, rows: Rows, width: int) -> Tensor:
        if width != self.vocab_size:
            raise ValueError(
                f"a top-k teacher over {self.vocab_size} tokens cannot be sliced to "
                f"{width}; store it at the shared vocabulary size"
            )
        top = take(self.log_probs, rows).float()
        ids = take(self.ids, rows).long()
        k = top.shape[1]
        # The remaining mass 1 - sum(exp(top)), in float64 ([n, 1] values: cheap) because it is
        # a small difference of numbers near 1 when the top-k carry most of the mass.
        rest = (-torch.expm1(torch.logsumexp(top.double(), -1, keepdim=True))).clamp_min(0.0)
        if k == self.vocab_size:
            fill = torch.full_like(top[:, :1], D.MASKED_LOGIT)
        else:  # log(rest / (V - k)); no rest mass at all -> the masked stand-in, not -inf
            log_fill = (rest.clamp_min(1e-300).log() - math.log(self.vocab_size - k)).float()
            fill = torch.where(rest > 0, log_fill, torch.full_like(log_fill, D.MASKED_LOGIT))
        out = fill.expand(-1, self.vocab_size).contiguous()
        return finite(out.scatter_(1, ids, top), fresh=True)


@dataclass
class ValidRowsTeacher:
    """A source that holds rows for the valid positions only (``labels != ignore_index``), in
    order, as a teacher cache does; it answers for the flattened positions like any source.

    Args:
        source: a :class:`TeacherSource` with one row per valid position.
        valid: ``[N]`` bool, which flattened positions are valid.
    """

    source: TeacherSource
    valid: Tensor

    def __post_init__(self) -> None:
        count = int(self.valid.sum())
        if self.source.num_rows != count:
            raise ValueError(
                f"the teacher has {self.source.num_rows} rows but the labels have "
                f"{count} valid positions; they must correspond one to one"
            )
        # position -> its row in ``source`` (meaningful at valid positions only)
        self._row_of = torch.cumsum(self.valid, 0) - 1

    @property
    def width(self) -> int:
        return self.source.width

    @property
    def num_rows(self) -> int:
        return self.valid.shape[0]

    def rows(self, rows: Rows, width: int) -> Tensor:
        if isinstance(rows, slice) and self.source.num_rows == self.num_rows:
            return self.source.rows(rows, width)  # every position valid: the same rows
        positions = (
            torch.arange(rows.start, rows.stop, device=self.valid.device)
            if isinstance(rows, slice)
            else rows
        )
        return self.source.rows(self._row_of.index_select(0, positions), width)


TeacherLike = Tensor | TeacherSource
"""What a public ``teacher`` argument accepts: a tensor (logits, or hidden states when an
output layer is given too), or a :class:`TeacherSource` over the flattened positions."""


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------
def from_logits(logits: Tensor, student_shape: torch.Size, what: str) -> LogitsTeacher:
    """A source over teacher logits ``[..., V_T]`` for the student's ``what`` of shape
    ``student_shape`` ``[..., X]`` (detached, flattened).

    Raises:
        ValueError / TypeError: the shapes differ before the last dimension, or the logits are
            not floating point.
    """
    if not logits.is_floating_point():
        raise TypeError(f"teacher_logits must be a floating-point tensor, got dtype {logits.dtype}")
    leading = student_shape[:-1]
    if logits.shape[:-1] != leading:
        raise ValueError(
            f"student {what} {tuple(student_shape)} and teacher logits "
            f"{tuple(logits.shape)} must have the same shape except the last "
            f"(vocabulary) dimension"
        )
    return LogitsTeacher(logits.detach().reshape(math.prod(leading), logits.shape[-1]))


def from_hidden(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, student_shape: torch.Size, what: str
) -> LinearTeacher:
    """A source over teacher hidden states ``[..., H_T]`` and output layer
    ``weight [V_T, H_T]`` (+ ``bias [V_T]``), all detached, for the student's ``what`` of shape
    ``student_shape``."""
    leading = student_shape[:-1]
    if hidden.shape[:-1] != leading:
        raise ValueError(
            f"student {what} {tuple(student_shape)} and teacher hidden states "
            f"{tuple(hidden.shape)} must have the same shape except the last "
            f"dimension"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"teacher_weight {tuple(weight.shape)} must be [V_T, H_T] with H_T = "
            f"the teacher hidden size {hidden.shape[-1]}"
        )
    flat = hidden.detach().reshape(math.prod(leading), hidden.shape[-1])
    return LinearTeacher(flat, weight.detach(), None if bias is None else bias.detach())


def as_source(
    teacher: TeacherLike,
    student_shape: torch.Size,
    what: str,
    *,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> TeacherSource:
    """The source for a public ``teacher`` argument: a source as it is, hidden states when
    ``weight`` is given, else logits.

    Raises:
        TypeError: ``teacher`` is neither a tensor nor a :class:`TeacherSource`.
    """
    if isinstance(teacher, Tensor):
        if weight is None:
            return from_logits(teacher, student_shape, what)
        return from_hidden(teacher, weight, bias, student_shape, what)
    if isinstance(teacher, TeacherSource):
        return teacher
    raise TypeError(
        f"teacher must be a tensor or a taid.sources.TeacherSource, got {type(teacher).__name__}"
    )


@torch.no_grad()
def from_model(
    model: Any, inputs: dict[str, Tensor], *, fused: bool, unwrapped: Any = None
) -> TeacherSource:
    """Run a teacher model on a batch's ``inputs`` and return its rows: its last hidden states
    and output layer when ``fused`` (the logits are then never materialised), else its logits.

    ``unwrapped`` is the model without its distributed wrapper (for the output layer), when
    ``model`` is wrapped.

    Raises:
        FloatingPointError: the teacher's outputs contain NaN or inf.
    """
    from taid import models as M  # transformers-facing; imported only when a model runs

    plain = model if unwrapped is None else unwrapped
    if fused:
        out = M.final_hidden(model, plain, **inputs)
    else:
        out = model(**inputs, use_cache=False).logits
    if not torch.isfinite(out).all():
        raise FloatingPointError(
            "the teacher's outputs contain NaN or inf (check "
            "teacher.dtype and train.mixed_precision)"
        )
    flat = out.reshape(-1, out.shape[-1])
    if fused:
        weight, bias = M.plain_linear_head(plain)
        return LinearTeacher(flat, weight, bias)
    return LogitsTeacher(flat)


def exact_logits(source: TeacherSource, width: int) -> Callable[[slice], Tensor]:
    """A function giving float32 teacher logits for a slice of rows, unclamped (``-inf``
    stays), and the same bytes however many threads or processes compute them: what a cache
    writer stores.

    On CPU, BLAS libraries (MKL) choose their blocking by the thread count, so a float32
    product of a few rows with the output layer can differ in its last bits between one and two
    threads; formed in float64 and rounded to float32, it does not (barring a tie at a rounding
    boundary, about one value in 2^29).
    """
    if isinstance(source, LogitsTeacher):
        logits = source.logits
        return lambda rows: logits[rows, :width].float()
    if not isinstance(source, LinearTeacher):
        raise TypeError(
            f"exact logits need dense logits or hidden states, got {type(source).__name__}"
        )
    hidden, weight = source.hidden, source.weight[:width]
    bias = None if source.bias is None else source.bias[:width]
    if hidden.device.type != "cpu":
        return lambda rows: F.linear(hidden[rows], weight, bias).float()
    weight64 = weight.double()
    bias64 = None if bias is None else bias.double()
    return lambda rows: F.linear(hidden[rows].double(), weight64, bias64).float()


def raise_bad_loss(
    student: Tensor,
    teacher: Tensor | None,
    label: int | None,
    divergence: str | None,
    position: int,
) -> None:
    """Raise the reason one token's loss is not a finite number, from its student and teacher
    logit rows (``[V]``, as the kernels saw them: ``-inf`` already at
    :data:`~taid.divergences.MASKED_LOGIT`), before any gradient reaches the weights.

    Raises:
        FloatingPointError: a side's logits contain NaN or +inf (named, with the position).
        ValueError: a slot masked on one side only makes the loss infinite
            (:func:`explain_infinite`).
    """
    for side, row in (("student", student), ("teacher", teacher)):
        if row is not None and not bool(torch.isfinite(row).all()):
            ids = (~torch.isfinite(row)).nonzero().flatten()[:5].tolist()
            raise FloatingPointError(
                f"the {side}'s logits contain NaN or +inf at flattened position {position} "
                f"(vocabulary ids {ids}); the loss would be NaN and its gradient would corrupt "
                f"the weights. Check the {side} model's outputs (learning rate, float16 "
                f"overflow, mixed precision)"
            )
    raise ValueError(explain_infinite(student, teacher, label, divergence))


def explain_infinite(
    student: Tensor, teacher: Tensor | None, label: int | None, divergence: str | None
) -> str:
    """Why one token's loss is infinite, from its finite student and teacher logit rows
    (``[V]``, masked slots at :data:`~taid.divergences.MASKED_LOGIT`)."""
    s_masked = student <= D.MASKED_LOGIT
    reasons = []
    if teacher is not None:
        t_masked = teacher <= D.MASKED_LOGIT
        only_student = (s_masked & ~t_masked).nonzero().flatten()[:5].tolist()
        only_teacher = (t_masked & ~s_masked).nonzero().flatten()[:5].tolist()
        if only_student:
            reasons.append(
                f"the student's logits are -inf at vocabulary ids {only_student} where "
                f"the teacher's are not (the teacher gives them probability)"
            )
        if only_teacher:
            reasons.append(
                f"the teacher's logits are -inf at vocabulary ids {only_teacher} where "
                f"the student's are not (the student gives them probability)"
            )
    if label is not None and bool(s_masked[label]):
        reasons.append(f"the label {label} is a slot the student's logits mask (-inf)")
    why = "; ".join(reasons) or "a vocabulary slot is masked (-inf) on one side only"
    return (
        f"the {divergence or 'cross-entropy'} loss is infinite for this token: {why}. A slot "
        f"masked on one side only makes forward KL (student masked), reverse KL (teacher "
        f"masked) and their mixes infinite; mask the same slots in both, or slice padding "
        f"rows with vocab_size"
    )
