"""Public functions: TAID, the baseline divergences and cross-entropy, on logits or fused with
the student's output layer.

Every function validates its inputs the same way, then computes one of two ways:

- ``implementation="chunked"`` (default): :mod:`taid.chunked` walks the valid tokens in chunks
  with analytic gradients; extra memory is the gradient buffer plus a few ``chunk x V``
  temporaries.
- ``implementation="eager"``: autograd through the kernels of :mod:`taid.divergences` on all
  valid tokens at once; several ``N x V`` temporaries. For debugging and double backward.

Notation per position: ``z_s`` student logits, ``z_T`` teacher logits, ``q = softmax(z_s)``,
``p = softmax(z_T)``. Arithmetic is float32 whatever the input dtype. ``-inf`` logits
(masked vocabulary slots) contribute 0, and a batch without valid tokens gives 0, never NaN.

Shapes: logits ``[..., V]``; ``labels`` ``[...]`` aligned with the logits (position ``i``
predicts ``labels[i]``; shift them before calling); ``labels=None`` counts every position.
Reductions: ``"mean"`` over valid tokens, ``"sum"`` (for loops that divide by the valid tokens of
a whole optimizer step), ``"none"`` (per position, 0 where masked; logits path only).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from taid import chunked as C
from taid import divergences as D
from taid import sources as S
from taid.sources import TeacherLike

Reduction = Literal["mean", "sum", "none"]
Implementation = Literal["chunked", "eager"]
_REDUCTIONS = ("mean", "sum", "none")
_IMPLEMENTATIONS = ("chunked", "eager")


class LossOutput(NamedTuple):
    """What a training loop needs from one loss call.

    Attributes:
        loss: what to backpropagate: ``(1 - w) * ce + w * distill``, reduced.
        distill: the divergence term, reduced, without gradient (drives TAID's schedule);
            ``None`` for cross-entropy alone.
        ce: cross-entropy on the labels, reduced, without gradient; ``None`` unless mixed in.
        num_tokens: number of valid positions (int64 scalar): the denominator of ``"mean"``,
            for token-weighted normalisation across micro-batches and ranks.
    """

    loss: Tensor
    distill: Tensor | None
    ce: Tensor | None
    num_tokens: Tensor


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
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


def valid_mask(
    labels: Tensor | None, leading_shape: torch.Size, ignore_index: int, device: torch.device
) -> Tensor:
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


def _check_float(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _objective(
    divergence: str | None,
    distill_weight: float,
    params: dict[str, float],
    has_teacher: bool,
    has_labels: bool,
    temperature: D.Temperature = 1.0,
    temperature_scaling: bool = False,
) -> C.Objective:
    if divergence is None:
        if params:
            raise ValueError(f"cross-entropy takes no divergence parameters, got {sorted(params)}")
        distill_weight = 0.0
    else:
        params = D.check_params(divergence, params)
        if not has_teacher:
            raise ValueError(f"divergence {divergence!r} needs the teacher, got None")
        if D.DIVERGENCES[divergence].needs_labels and not has_labels:
            raise ValueError(
                f"divergence {divergence!r} needs labels (each position's target token), got None"
            )
    if not 0.0 <= distill_weight <= 1.0:
        raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight}")
    if distill_weight < 1.0 and not has_labels:
        raise ValueError(
            "cross-entropy on the labels (distill_weight < 1 or SFT) needs labels, got None"
        )
    check_temperature(temperature)
    return C.Objective(
        divergence, params, float(distill_weight), temperature, bool(temperature_scaling)
    )


def check_temperature(temperature: D.Temperature) -> None:
    """A fixed temperature must be a finite number > 0; a tensor must be one value."""
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(
                f"a temperature tensor must hold one value, got shape {tuple(temperature.shape)}"
            )
        return
    if isinstance(temperature, bool) or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_labels_in_vocab(labels: Tensor, width: int, ignore_index: int) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= width):
        bad = labels[(labels < 0) | (labels >= width)][0].item()
        raise ValueError(
            f"label {bad} is outside the vocabulary [0, {width}) and is not ignore_index "
            f"({ignore_index}); check the tokenizer, the padding label and ignore_index"
        )


def _check_options(reduction: str, implementation: str, chunk_size: int | None) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}"
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _reduce_detached(
    per_token: Tensor | None, idx: Tensor, n_rows: int, shape: torch.Size, reduction: str
) -> Tensor | None:
    if per_token is None:
        return None
    with torch.no_grad():
        return C.reduce_rows(per_token.detach(), idx, n_rows, reduction).reshape(
            shape if reduction == "none" else ()
        )


class _Plan(NamedTuple):
    teacher: S.TeacherSource | None
    objective: C.Objective
    width: int
    idx: Tensor
    labels: Tensor | None


def _plan(
    divergence: str | None,
    teacher: S.TeacherSource | None,
    what: str,
    student_shape: torch.Size,
    student_width: int,
    labels: Tensor | None,
    ignore_index: int,
    vocab_size: int | None,
    distill_weight: float,
    params: dict[str, float],
    device: torch.device,
    temperature: D.Temperature = 1.0,
    temperature_scaling: bool = False,
) -> _Plan:
    """What both entry points decide once the teacher is a source: the objective, the shared
    width, the valid rows and their labels."""
    leading = student_shape[:-1]
    n_rows = math.prod(leading)
    if divergence is None:
        teacher = None
    if teacher is not None and teacher.num_rows != n_rows:
        raise ValueError(
            f"the teacher covers {teacher.num_rows} positions but the student's "
            f"{what} {tuple(student_shape)} have {n_rows}"
        )
    objective = _objective(
        divergence,
        distill_weight,
        params,
        teacher is not None,
        labels is not None,
        temperature,
        temperature_scaling,
    )
    width = resolve_vocab(student_width, None if teacher is None else teacher.width, vocab_size)
    idx = valid_mask(labels, leading, ignore_index, device).nonzero().squeeze(1)
    flat_labels = None if labels is None else labels.reshape(-1).index_select(0, idx)
    uses_labels = objective.distill_weight < 1.0 or (
        divergence is not None and D.DIVERGENCES[divergence].needs_labels
    )
    if uses_labels and flat_labels is not None:
        _check_labels_in_vocab(flat_labels, width, ignore_index)
    return _Plan(teacher, objective, width, idx, flat_labels)


def _output(
    loss: Tensor, stats: C.ChunkStats, idx: Tensor, leading: torch.Size, reduction: str
) -> LossOutput:
    n_rows = math.prod(leading)
    return LossOutput(
        loss.reshape(leading) if reduction == "none" else loss,
        _reduce_detached(stats.distill, idx, n_rows, leading, reduction),
        _reduce_detached(stats.ce, idx, n_rows, leading, reduction),
        idx.new_tensor(idx.numel()),
    )


# --------------------------------------------------------------------------------------------
# The entry points every loss goes through
# --------------------------------------------------------------------------------------------
def loss_terms(
    divergence: str | None,
    student_logits: Tensor,
    teacher_logits: TeacherLike | None,
    labels: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    vocab_size: int | None = None,
    distill_weight: float = 1.0,
    implementation: Implementation = "chunked",
    chunk_size: int | None = None,
    temperature: D.Temperature = 1.0,
    temperature_scaling: bool = False,
    **params: float,
) -> LossOutput:
    """``(1 - w) * CE + w * divergence`` on logits, with its parts and the valid-token count.

    Args:
        divergence: a key of :data:`taid.divergences.DIVERGENCES`, or ``None`` for
            cross-entropy alone.
        student_logits: ``[..., V_s]``.
        teacher_logits: ``[..., V_T]``, or a :class:`taid.sources.TeacherSource` over the
            flattened positions (e.g. a top-k teacher or a teacher cache's rows); ``None`` for
            CE alone.
        labels: ``[...]`` aligned with the logits; required when ``w < 1``.
        ignore_index: label value that excludes a position.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        vocab_size: shared tokenizer length when the widths differ.
        distill_weight: ``w``; 1 is the pure divergence.
        implementation: ``"chunked"`` or ``"eager"``.
        chunk_size: rows per chunk (chunked only); ``None`` picks one from ``N`` and ``V``.
        temperature: ``tau``: the divergence sees ``z_s / tau`` and ``z_T / tau`` (the
            cross-entropy term does not). A 0-d tensor that requires grad is learned: its
            gradient is returned by backward (as CTKD trains it).
        temperature_scaling: multiply the divergence by ``tau^2``, so that its gradient keeps
            the scale it has at ``tau = 1`` (Hinton et al.).
        **params: the divergence's hyperparameters (``t``, ``beta``, ``alpha``, ``mu``).
    """
    _check_options(reduction, implementation, chunk_size)
    _check_float("student_logits", student_logits)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have a vocabulary dimension, got a scalar")
    leading = student_logits.shape[:-1]
    n_rows = math.prod(leading)
    teacher = None
    if divergence is not None and teacher_logits is not None:
        teacher = S.as_source(teacher_logits, student_logits.shape, "logits")
    teacher, objective, width, idx, flat_labels = _plan(
        divergence,
        teacher,
        "logits",
        student_logits.shape,
        student_logits.shape[-1],
        labels,
        ignore_index,
        vocab_size,
        distill_weight,
        params,
        student_logits.device,
        temperature,
        temperature_scaling,
    )
    student = student_logits.reshape(n_rows, student_logits.shape[-1])

    if implementation == "eager":
        loss, stats = _eager_logits_loss(
            student, idx, teacher, flat_labels, objective, width, reduction
        )
    else:
        loss, stats = C.chunked_logits_loss(
            student,
            idx,
            teacher,
            flat_labels,
            objective,
            width=width,
            chunk_size=chunk_size,
            reduction=reduction,
        )
    return _output(loss, stats, idx, leading, reduction)


def _eager_logits_loss(
    student: Tensor,
    idx: Tensor,
    teacher: S.TeacherSource | None,
    flat_labels: Tensor | None,
    objective: C.Objective,
    width: int,
    reduction: Reduction,
) -> tuple[Tensor, C.ChunkStats]:
    """The eager path of :func:`loss_terms`: every valid row of ``student`` ``[N, V_s]`` at
    once, through autograd, with the same checks as the chunked path (a loss above
    ``INFINITE_LOSS`` names its row)."""
    n_rows = student.shape[0]
    rows = slice(0, n_rows) if idx.numel() == n_rows else idx
    s = S.finite(S.take(student[:, :width], rows), fresh=False)
    z = None if teacher is None else teacher.rows(rows, width)
    out = D.mixed(
        s,
        z,
        flat_labels,
        divergence=objective.divergence,
        params=objective.params,
        distill_weight=objective.distill_weight,
        temperature=objective.temperature,
        temperature_scaling=objective.temperature_scaling,
    )
    finite_enough = out.loss.detach() <= D.INFINITE_LOSS  # False for NaN too
    if out.loss.numel() and not bool(finite_enough.all()):
        i = int((~finite_enough).nonzero()[0])
        S.raise_bad_loss(
            s[i].detach(),
            None if z is None else z[i],
            int(flat_labels[i])
            if flat_labels is not None and objective.distill_weight < 1
            else None,
            objective.divergence,
            int(idx[i]),
        )
    loss = C.reduce_rows(out.loss, idx, n_rows, reduction)
    return loss, C.ChunkStats(loss.detach(), out.distill, out.ce)


def _check_fused_inputs(
    reduction: Reduction,
    chunk_size: int | None,
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
) -> None:
    """The fused path's options and the student's output layer: hidden ``[..., H]``, weight
    ``[V, H]`` of the same dtype, bias ``[V]``; a per-position loss is the logits path's."""
    _check_options(reduction, "chunked", chunk_size)
    if reduction == "none":
        raise ValueError(
            "the fused output-layer path supports reduction 'mean' or 'sum'; use "
            "the logits path (loss_terms / taid_loss) for per-position losses"
        )
    for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight)):
        _check_float(name, x)
    if student_weight.dim() != 2 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(
            f"student_weight {tuple(student_weight.shape)} must be [V, H] with H = "
            f"student_hidden's last dimension ({tuple(student_hidden.shape)})"
        )
    if student_hidden.dtype != student_weight.dtype:
        raise TypeError(
            f"student_hidden ({student_hidden.dtype}) and student_weight "
            f"({student_weight.dtype}) must share a dtype"
        )
    if student_bias is not None and student_bias.shape != student_weight.shape[:1]:
        raise ValueError(
            f"student_bias {tuple(student_bias.shape)} must be [{student_weight.shape[0]}]"
        )


def fused_linear_terms(
    divergence: str | None,
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher: TeacherLike | None,
    labels: Tensor | None = None,
    *,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum"] = "mean",
    vocab_size: int | None = None,
    distill_weight: float = 1.0,
    chunk_size: int | None = None,
    temperature: D.Temperature = 1.0,
    temperature_scaling: bool = False,
    **params: float,
) -> LossOutput:
    """Like :func:`loss_terms`, from the student's last hidden states and output layer.

    ``student_logits = student_hidden @ student_weight.T + student_bias`` is formed one chunk
    of tokens at a time, so the full student logits never exist. Gradients flow to
    ``student_hidden``, ``student_weight`` and ``student_bias``; tied embeddings work (the
    weight's gradient accumulates with the embedding's).

    Only a plain linear output layer is exact here: models that soft-cap or scale their final
    logits must use the logits path (see :func:`taid.models.plain_linear_head`).

    Args:
        student_hidden: ``[..., H]``.
        student_weight: ``[V_s, H]`` (same dtype as ``student_hidden``).
        teacher: teacher logits ``[..., V_T]``, teacher hidden states ``[..., H_T]`` when
            ``teacher_weight`` is given, or a :class:`taid.sources.TeacherSource`.
        labels: ``[...]``.
        teacher_weight: ``[V_T, H_T]`` teacher output layer; its logits are formed chunk by chunk.
        teacher_bias: ``[V_T]`` bias of the teacher output layer.
        student_bias: ``[V_s]``.
        reduction: ``"mean"`` or ``"sum"`` (the per-position gradient of ``"none"`` cannot be
            folded into the weight gradient).
        Other arguments: as :func:`loss_terms`.
    """
    _check_fused_inputs(reduction, chunk_size, student_hidden, student_weight, student_bias)
    leading = student_hidden.shape[:-1]
    n_rows = math.prod(leading)
    teacher_source = None
    if divergence is not None and teacher is not None:
        teacher_source = S.as_source(
            teacher, student_hidden.shape, "hidden states", weight=teacher_weight, bias=teacher_bias
        )
    teacher_source, objective, width, idx, flat_labels = _plan(
        divergence,
        teacher_source,
        "hidden states",
        student_hidden.shape,
        student_weight.shape[0],
        labels,
        ignore_index,
        vocab_size,
        distill_weight,
        params,
        student_hidden.device,
        temperature,
        temperature_scaling,
    )
    loss, stats = C.fused_linear_loss(
        student_hidden.reshape(n_rows, -1),
        student_weight,
        student_bias,
        idx,
        teacher_source,
        flat_labels,
        objective,
        width=width,
        chunk_size=chunk_size,
        reduction=reduction,
    )
    return _output(loss, stats, idx, leading, reduction)


# --------------------------------------------------------------------------------------------
# Public functions, one pair per divergence, derived from its description
# --------------------------------------------------------------------------------------------
_LOGITS_OPTIONS: dict[str, Any] = {
    "ignore_index": -100,
    "reduction": "mean",
    "vocab_size": None,
    "implementation": "chunked",
    "chunk_size": None,
    "temperature": 1.0,
    "temperature_scaling": False,
}
_FUSED_OPTIONS: dict[str, Any] = {
    "teacher_weight": None,
    "teacher_bias": None,
    "student_bias": None,
    "ignore_index": -100,
    "reduction": "mean",
    "chunk_size": None,
    "vocab_size": None,
    "temperature": 1.0,
    "temperature_scaling": False,
}
_ARGS_DOC = """
    Args:
        {inputs}
        labels: ``[...]`` aligned with the {what} (position i predicts ``labels[i]``); only
            ``ignore_index`` matters. ``None``: every position counts.
{params}        ignore_index: label value of excluded positions.
        reduction: ``"mean"`` over valid tokens, ``"sum"``{none}.
        vocab_size: slice both widths to this shared tokenizer length (required if they differ).
        chunk_size: rows per chunk; ``None`` picks one.{extra}

    Returns:
        The reduced loss (gradient flows to the student only).
"""


def _signature(
    spec: D.Divergence, leading: list[str], options: dict[str, Any]
) -> inspect.Signature:
    P = inspect.Parameter
    params = [P(name, P.POSITIONAL_OR_KEYWORD) for name in leading]
    params.append(P("labels", P.POSITIONAL_OR_KEYWORD, default=None))
    params += [
        P(p.name, P.KEYWORD_ONLY, **({} if p.default is None else {"default": p.default}))
        for p in spec.params
    ]
    params += [P(name, P.KEYWORD_ONLY, default=default) for name, default in options.items()]
    return inspect.Signature(params, return_annotation=Tensor)


def _bind(
    fn_name: str, spec: D.Divergence, options: dict[str, Any], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Keyword arguments of a generated function with defaults filled in; TypeError like a
    hand-written signature for an unknown or a missing one."""
    allowed = {p.name for p in spec.params} | set(options)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"{fn_name}() got an unexpected keyword argument {unknown[0]!r}")
    out = {**options, **spec.defaults(), **kwargs}
    missing = [p.name for p in spec.params if p.name not in out]
    if missing:
        raise TypeError(f"{fn_name}() missing required keyword argument {missing[0]!r}")
    return out


def _params_doc(spec: D.Divergence) -> str:
    return "".join(
        f"        {p.name}: {p.doc}; in {p.interval()}"
        + (f" (default {p.default:g})" if p.default is not None else "")
        + ".\n"
        for p in spec.params
    )


def _logits_function(spec: D.Divergence) -> Callable[..., Tensor]:
    def fn(
        student_logits: Tensor,
        teacher_logits: TeacherLike,
        labels: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        bound = _bind(spec.function, spec, _LOGITS_OPTIONS, kwargs)
        return loss_terms(spec.name, student_logits, teacher_logits, labels, **bound).loss

    fn.__name__ = fn.__qualname__ = spec.function
    fn.__signature__ = _signature(  # type: ignore[attr-defined]
        spec, ["student_logits", "teacher_logits"], _LOGITS_OPTIONS
    )
    fn.__doc__ = (
        f"``{spec.formula}`` on logits (registry name ``{spec.name}``).\n"
        + _ARGS_DOC.format(
            inputs="student_logits: ``[..., V_s]`` (gradient flows here).\n        "
            "teacher_logits: ``[..., V_T]`` teacher logits, or a teacher source over the "
            "flattened positions.",
            what="logits",
            params=_params_doc(spec),
            none=', or ``"none"`` (shape ``[...]``)',
            extra='\n        implementation: ``"chunked"`` (memory-lean) or ``"eager"`` '
            "(autograd).",
        )
    )
    return fn


def _fused_function(spec: D.Divergence) -> Callable[..., Tensor]:
    name = f"fused_linear_{spec.function}"

    def fn(
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher: TeacherLike,
        labels: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        bound = _bind(name, spec, _FUSED_OPTIONS, kwargs)
        return fused_linear_terms(
            spec.name, student_hidden, student_weight, teacher, labels, **bound
        ).loss

    fn.__name__ = fn.__qualname__ = name
    fn.__signature__ = _signature(  # type: ignore[attr-defined]
        spec, ["student_hidden", "student_weight", "teacher"], _FUSED_OPTIONS
    )
    fn.__doc__ = (
        f"``{spec.formula}`` without materialising the student's logits (registry "
        f"name ``{spec.name}``); see :func:`fused_linear_terms`.\n"
    ) + _ARGS_DOC.format(
        inputs="student_hidden: ``[..., H]``; student_weight: ``[V_s, H]`` (and student_bias "
        "``[V_s]``): ``z_s = hidden @ weight.T + bias`` is formed chunk by chunk.\n"
        "        teacher: teacher logits ``[..., V_T]``, teacher hidden states "
        "``[..., H_T]`` with teacher_weight ``[V_T, H_T]`` (and teacher_bias), or a "
        "teacher source.",
        what="hidden states",
        params=_params_doc(spec),
        none="",
        extra="",
    )
    return fn


def publish(spec: D.Divergence) -> None:
    """Make ``<spec.function>`` and ``fused_linear_<spec.function>`` public functions of this
    module (see :func:`taid.losses.register_divergence`)."""
    globals()[spec.function] = _logits_function(spec)
    globals()[f"fused_linear_{spec.function}"] = _fused_function(spec)


for _spec in D.DIVERGENCES.values():
    publish(_spec)


def cross_entropy(
    student_logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    vocab_size: int | None = None,
    implementation: Implementation = "chunked",
    chunk_size: int | None = None,
) -> Tensor:
    """Cross-entropy ``-log q[label]`` on the labels (plain SFT), float32, same masking."""
    return loss_terms(
        None,
        student_logits,
        None,
        labels,
        ignore_index=ignore_index,
        reduction=reduction,
        vocab_size=vocab_size,
        implementation=implementation,
        chunk_size=chunk_size,
    ).loss


# --------------------------------------------------------------------------------------------
# Cross-entropy fused with the output layer (the divergences' fused functions are derived above)
# --------------------------------------------------------------------------------------------
def fused_linear_cross_entropy(
    student_hidden: Tensor, student_weight: Tensor, labels: Tensor, **kwargs
) -> Tensor:
    """Cross-entropy on the labels fused with the output layer."""
    return fused_linear_terms(None, student_hidden, student_weight, None, labels, **kwargs).loss
