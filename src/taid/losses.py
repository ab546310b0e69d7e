"""Loss modules over :mod:`taid.functional`, and the registry that names them.

Every module has hyperparameters in ``__init__`` and tensors in ``forward``; ``forward`` is
pure, state changes only in :meth:`DistillationLoss.step`. With ``distill_weight = w < 1`` the
loss is ``(1 - w) * CE(labels) + w * divergence`` over the same valid tokens.
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from taid import functional as TF
from taid.divergences import DIVERGENCES, Divergence, check_params
from taid.functional import LossOutput
from taid.scheduler import TAIDScheduler
from taid.sources import TeacherLike


class DistillationLoss(nn.Module):
    """Base of every registered loss.

    Args:
        distill_weight: ``w`` in ``(1 - w) * CE + w * divergence``; 1 (default) is the pure
            divergence, anything below needs labels.
        ignore_index: label value of positions to exclude.
        reduction: ``"mean"`` over valid tokens, ``"sum"``, or ``"none"`` (per position).
        vocab_size: shared tokenizer length when student and teacher widths differ.
        implementation: ``"chunked"`` (default: analytic gradients, a chunk of tokens at a
            time, no full-vocabulary temporaries) or ``"eager"`` (autograd; for debugging).
        chunk_size: rows per chunk; ``None`` picks one from the number of tokens and ``V``.
        temperature: ``tau``; the divergence compares ``softmax(z / tau)`` of both sides (the
            cross-entropy term is not tempered). 1 (default) is the plain divergence.
        temperature_scaling: multiply the divergence by ``tau^2`` so that its gradient keeps
            the scale it has at ``tau = 1``.

    Shapes:
        student_logits ``[..., V_s]``, teacher_logits ``[..., V_T]``, labels ``[...]`` aligned
        with the logits (position i predicts ``labels[i]``).
    """

    spec: ClassVar[Divergence | None] = None
    """The divergence's description (:data:`taid.divergences.DIVERGENCES`); None for SFT."""
    divergence: ClassVar[str | None] = None

    def __init__(
        self,
        *,
        distill_weight: float = 1.0,
        ignore_index: int = -100,
        reduction: TF.Reduction = "mean",
        vocab_size: int | None = None,
        implementation: TF.Implementation = "chunked",
        chunk_size: int | None = None,
        temperature: float = 1.0,
        temperature_scaling: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight}")
        TF._check_options(reduction, implementation, chunk_size)
        TF.check_temperature(temperature)
        self.distill_weight = float(distill_weight)
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.vocab_size = vocab_size
        self.implementation = implementation
        self.chunk_size = chunk_size
        self.temperature = float(temperature)
        self.temperature_scaling = bool(temperature_scaling)

    def current_temperature(self) -> float | Tensor:
        """The temperature of this call (a tensor for a loss that learns it)."""
        return self.temperature

    def divergence_params(self) -> dict[str, float]:
        """Hyperparameters passed to the divergence kernel at this moment."""
        return {}

    def _common(self) -> dict[str, Any]:
        return dict(
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            vocab_size=self.vocab_size,
            distill_weight=self.distill_weight,
            chunk_size=self.chunk_size,
            temperature=self.current_temperature(),
            temperature_scaling=self.temperature_scaling,
            **self.divergence_params(),
        )

    def compute(
        self,
        student_logits: Tensor,
        teacher_logits: TeacherLike | None = None,
        labels: Tensor | None = None,
    ) -> LossOutput:
        """The loss with its parts and the valid-token count; does not change any state.

        Shapes: ``student_logits [..., V_s]``, ``teacher_logits [..., V_T]``, ``labels [...]``.
        """
        return TF.loss_terms(
            self.divergence,
            student_logits,
            teacher_logits,
            labels,
            implementation=self.implementation,
            **self._common(),
        )

    def compute_fused(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher: TeacherLike | None = None,
        labels: Tensor | None = None,
        *,
        student_bias: Tensor | None = None,
        teacher_weight: Tensor | None = None,
        teacher_bias: Tensor | None = None,
    ) -> LossOutput:
        """As :meth:`compute`, from the student's last hidden states ``[..., H]`` and output
        layer ``[V_s, H]`` so that the full student logits never exist. ``teacher`` is teacher
        logits, or teacher hidden states when ``teacher_weight`` is given. See
        :func:`taid.functional.fused_linear_terms`."""
        return TF.fused_linear_terms(
            self.divergence,
            student_hidden,
            student_weight,
            teacher,
            labels,
            student_bias=student_bias,
            teacher_weight=teacher_weight,
            teacher_bias=teacher_bias,
            **self._common(),
        )

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: TeacherLike | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """The reduced loss (see :meth:`compute` for its parts)."""
        return self.compute(student_logits, teacher_logits, labels).loss

    def step(self, loss: float | Tensor) -> float | None:
        """Advance adaptive state once per optimizer step; a no-op for static losses."""
        return None

    def advance(self, loss: float | Tensor) -> dict[str, float]:
        """:meth:`step` once per optimizer step, returning what to log for that step, with the
        same keys wherever the loss is trained (taid's loop, the Trainer integration): for TAID
        ``t`` (the value this step trained with), ``t_next``, ``dt`` and ``momentum``; nothing
        for a static loss."""
        self.step(loss)
        return {}

    def extra_repr(self) -> str:
        params = {
            **self.divergence_params(),
            "distill_weight": self.distill_weight,
            "ignore_index": self.ignore_index,
            "reduction": self.reduction,
            "implementation": self.implementation,
        }
        if self.vocab_size is not None:
            params["vocab_size"] = self.vocab_size
        if self.temperature != 1.0 or self.temperature_scaling:
            params["temperature"] = self.temperature
            params["temperature_scaling"] = self.temperature_scaling
        return ", ".join(f"{k}={v!r}" for k, v in params.items())


class TAIDLoss(DistillationLoss):
    """TAID: KL(p_t || q) with ``p_t = softmax((1 - t) * stopgrad(z_s) + t * z_T)``.

    ``t`` comes from a :class:`~taid.scheduler.TAIDScheduler`: pass one, or its keyword
    arguments. ``forward`` uses the current ``t`` and never changes it; call :meth:`step` once
    per optimizer step with that step's TAID term (``compute(...).distill``, token-weighted over
    the whole step). The scheduler state is part of ``state_dict()``, so restoring a checkpoint of
    the module restores ``t`` exactly.

    Example::

        loss_fn = TAIDLoss(total_steps=1000)
        out = loss_fn.compute(student_logits, teacher_logits, labels)
        out.loss.backward(); optimizer.step(); optimizer.zero_grad()
        loss_fn.step(out.distill)
    """

    divergence = "taid"

    def __init__(self, scheduler: TAIDScheduler | None = None, **kwargs: Any) -> None:
        # The schedule's settings are TAIDScheduler's own (t_start, alpha, total_steps, ...,
        # with its defaults); the rest are the options every loss shares.
        schedule = {k: kwargs.pop(k) for k in _SCHEDULER_PARAMS if k in kwargs}
        super().__init__(**kwargs)
        if scheduler is None:
            scheduler = TAIDScheduler(**schedule)
        elif schedule:
            raise ValueError(f"give a scheduler or its settings {sorted(schedule)}, not both")
        self.scheduler = scheduler

    @property
    def t(self) -> float:
        """The current interpolation coefficient."""
        return self.scheduler.t

    def divergence_params(self) -> dict[str, float]:
        return {"t": self.scheduler.t}

    def step(self, loss: float | Tensor) -> float:
        """Advance ``t`` from this optimizer step's TAID objective; returns the new ``t``."""
        return self.scheduler.step(loss)

    def advance(self, loss: float | Tensor) -> dict[str, float]:
        used = self.scheduler.t
        self.step(loss)
        sched = self.scheduler
        return {"t": used, "t_next": sched.t, "dt": sched.dt, "momentum": sched.momentum}

    def get_extra_state(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)


class DivergenceLoss(DistillationLoss):
    """A registered divergence with fixed hyperparameters (``beta``, ``alpha``, ``mu``, ...).

    One subclass per entry of :data:`taid.divergences.DIVERGENCES` is derived from its
    description (:func:`_divergence_class`): name, hyperparameters, defaults and ranges.
    """

    def __init__(self, **kwargs: Any) -> None:
        assert self.spec is not None
        params = {p.name: kwargs.pop(p.name, p.default) for p in self.spec.params}
        missing = [name for name, value in params.items() if value is None]
        if missing:
            raise TypeError(f"{type(self).__name__} needs {missing}")
        super().__init__(**kwargs)
        self.params = check_params(self.spec.name, params)
        for name, value in self.params.items():
            setattr(self, name, value)

    def divergence_params(self) -> dict[str, float]:
        return dict(self.params)


def _divergence_class(spec: Divergence) -> type[DivergenceLoss]:
    """The ``nn.Module`` of a divergence: :class:`DivergenceLoss` with its description."""
    params = "".join(
        f"\n        {p.name}: {p.doc}; in {p.interval()} (default {p.default:g})."
        for p in spec.params
    )
    doc = (
        f"``{spec.formula}`` (registry name ``{spec.name}``).\n\n    Args:{params}\n"
        f"        Other arguments: see :class:`DistillationLoss`.\n    "
    )
    cls = type(
        spec.class_name,
        (DivergenceLoss,),
        {"spec": spec, "divergence": spec.name, "__doc__": doc, "__module__": __name__},
    )
    P = inspect.Parameter
    cls.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [P(p.name, P.KEYWORD_ONLY, default=p.default) for p in spec.params]
        + [
            p
            for p in inspect.signature(DistillationLoss.__init__).parameters.values()
            if p.name != "self"
        ]
    )
    return cls


class SFTLoss(DistillationLoss):
    """Plain supervised fine-tuning: cross-entropy on the labels; the teacher is ignored."""

    divergence = None

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: TF.Reduction = "mean",
        vocab_size: int | None = None,
        implementation: TF.Implementation = "chunked",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(
            distill_weight=0.0,
            ignore_index=ignore_index,
            reduction=reduction,
            vocab_size=vocab_size,
            implementation=implementation,
            chunk_size=chunk_size,
        )


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-scale`` (gradient reversal,
    Ganin and Lempitsky 2015): what follows is maximised by what precedes."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * -ctx.scale, None


class CTKDLoss(DistillationLoss):
    """Curriculum Temperature KD (Li et al., AAAI 2023), its global-temperature form, for
    language models: forward KL at a learned temperature, times ``tau^2``::

        tau = t_min + t_range * sigmoid(theta)

    ``theta`` (a parameter of this module, which the training loop must optimise) is trained
    adversarially: its gradient passes a gradient-reversal layer of coefficient ``lambda``, so
    ``tau`` moves to make the student's task harder while the student minimises the loss.
    ``lambda`` rises from ``lambda_min`` to ``lambda_max`` along a cosine curriculum over
    ``total_steps`` optimizer steps (one :meth:`step` per optimizer step).

    Args:
        t_min, t_range: the temperature's range ``[t_min, t_min + t_range]`` (CTKD: 1, 20).
        theta_init: initial ``theta`` (the reference code's 1: ``tau`` starts near 15.6).
        lambda_min, lambda_max: the curriculum of the reversal coefficient.
        total_steps: the run's optimizer steps.
        temperature_scaling: multiply by ``tau^2`` (CTKD does; default True).
        **kwargs: the options of :class:`DistillationLoss` (not ``temperature``: it is learned).
    """

    divergence = "fkl"

    def __init__(
        self,
        *,
        t_min: float = 1.0,
        t_range: float = 20.0,
        theta_init: float = 1.0,
        lambda_min: float = 0.0,
        lambda_max: float = 1.0,
        total_steps: int | None = None,
        temperature_scaling: bool = True,
        **kwargs: Any,
    ) -> None:
        if "temperature" in kwargs:
            raise ValueError(
                "ctkd learns its temperature; set t_min and t_range instead of temperature"
            )
        super().__init__(temperature_scaling=temperature_scaling, **kwargs)
        if not (t_min > 0 and t_range >= 0):
            raise ValueError(f"need t_min > 0 and t_range >= 0, got {t_min}, {t_range}")
        if not 0.0 <= lambda_min <= lambda_max:
            raise ValueError(f"need 0 <= lambda_min <= lambda_max, got {lambda_min}, {lambda_max}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(
                f"total_steps must be a positive int (the run's optimizer steps), "
                f"got {total_steps!r}"
            )
        self.t_min, self.t_range = float(t_min), float(t_range)
        self.lambda_min, self.lambda_max = float(lambda_min), float(lambda_max)
        self.total_steps = total_steps
        self.num_steps = 0
        self.theta = nn.Parameter(torch.tensor(float(theta_init)))

    def grl_lambda(self) -> float:
        """The reversal coefficient at the current step (cosine from min to max)."""
        frac = min(self.num_steps, self.total_steps) / self.total_steps
        return self.lambda_min + (self.lambda_max - self.lambda_min) * 0.5 * (
            1.0 - math.cos(math.pi * frac)
        )

    def current_temperature(self) -> Tensor:
        theta = _ReverseGradient.apply(self.theta, self.grl_lambda())
        return self.t_min + self.t_range * torch.sigmoid(theta)

    def step(self, loss: float | Tensor) -> None:
        self.num_steps += 1

    def advance(self, loss: float | Tensor) -> dict[str, float]:
        with torch.no_grad():
            used = float(self.current_temperature())
        lam = self.grl_lambda()
        self.step(loss)
        return {"temperature": used, "grl_lambda": lam}

    def get_extra_state(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "total_steps": self.total_steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["total_steps"] != self.total_steps:
            raise ValueError(
                f"CTKD state was saved with total_steps={state['total_steps']}, "
                f"this loss has {self.total_steps}"
            )
        self.num_steps = int(state["num_steps"])


_SCHEDULER_PARAMS = [
    p.name
    for p in inspect.signature(TAIDScheduler.__init__).parameters.values()
    if p.name != "self"
]
TAIDLoss.spec = DIVERGENCES["taid"]
TAIDLoss.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("scheduler", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
    + [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(TAIDScheduler.__init__).parameters.values()
        if p.name != "self"
    ]
    + [
        p
        for p in inspect.signature(DistillationLoss.__init__).parameters.values()
        if p.name != "self"
    ]
)
LOSSES: dict[str, type[DistillationLoss]] = {"taid": TAIDLoss}
"""Every loss by its registry name (the ``loss.name`` of a config): one per divergence of
:data:`taid.divergences.DIVERGENCES`, and ``sft``."""


def register_divergence(spec: Divergence) -> type[DistillationLoss]:
    """Add a divergence to every surface at once: :data:`taid.divergences.DIVERGENCES`, the
    functions ``taid.functional.<function>`` and ``fused_linear_<function>``, its module
    (returned, also ``taid.<class_name>``), :data:`LOSSES` (so ``build_loss`` and configs'
    ``loss.name`` know it) and config validation of its parameters.

    The built-in divergences go through it when the package is imported; a project can
    register its own the same way without changing taid.

    Raises:
        ValueError: the name is taken by another divergence, or is ``sft``.
    """
    import sys

    known = DIVERGENCES.get(spec.name)
    if spec.name == "sft" or (known is not None and known is not spec):
        raise ValueError(f"a loss named {spec.name!r} exists already")
    DIVERGENCES[spec.name] = spec
    TF.publish(spec)
    cls = LOSSES.get(spec.name) or _divergence_class(spec)
    LOSSES[spec.name] = cls
    globals()[cls.__name__] = cls
    package = sys.modules.get("taid")
    if package is not None:  # taid.<ClassName>, also for divergences registered later
        setattr(package, cls.__name__, cls)
    return cls


for _spec in list(DIVERGENCES.values()):
    register_divergence(_spec)
LOSSES["ctkd"] = CTKDLoss
LOSSES["sft"] = SFTLoss


def loss_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments ``build_loss(name, ...)`` accepts, with their defaults."""
    cls = _lookup(name)
    params: dict[str, inspect.Parameter] = {}
    signature = getattr(cls, "__signature__", None)
    if signature is not None:  # a derived divergence class
        return {p.name: p for p in signature.parameters.values()}
    for klass in reversed(cls.__mro__):
        if klass is nn.Module or not issubclass(klass, DistillationLoss):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params[p.name] = p
    if cls is SFTLoss:  # cross-entropy alone: no divergence term to weigh or temper
        for name in ("distill_weight", "temperature", "temperature_scaling"):
            params.pop(name, None)
    if cls is CTKDLoss:  # learned
        params.pop("temperature", None)
    return params


def shared_loss_options() -> set[str]:
    """The options every loss takes (:class:`DistillationLoss`'s), as opposed to one loss's
    own parameters."""
    init = inspect.signature(DistillationLoss.__init__).parameters
    return {name for name in init if name != "self"}


def _lookup(name: str) -> type[DistillationLoss]:
    if name not in LOSSES:
        close = difflib.get_close_matches(str(name), LOSSES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}.{hint}")
    return LOSSES[name]


def build_loss(name: str, **kwargs: Any) -> DistillationLoss:
    """Build a registered loss by name, e.g. ``build_loss("taid", total_steps=1000)``.

    Raises:
        ValueError: unknown name (lists the valid ones) or a keyword the loss does not take.
    """
    cls = _lookup(name)
    accepted = loss_parameters(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} does not take {unknown}; it accepts {sorted(accepted)}")
    return cls(**kwargs)
