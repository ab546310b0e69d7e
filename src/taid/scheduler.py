"""The adaptive interpolation schedule of TAID (Shing et al., ICLR 2025, section 3.2)."""

from __future__ import annotations

import math
import warnings
from typing import Any

from torch import Tensor

_CONFIG_KEYS = ("t_start", "t_end", "alpha", "beta", "total_steps", "adaptive")
DEFAULT_ALPHA = 5e-4
PAPER_ALPHA_PER_RUN = 7.8
"""``alpha * N`` of the paper's instruction-tuning runs: ``alpha = 5e-4`` over about 15,600
optimizer steps (5 epochs of ~200k conversations at batch 64). ``alpha_per_run=7.8`` gives a run
of any length the same schedule shape."""
_STATE_KEYS = ("t", "momentum", "dt", "prev_loss", "num_steps")


def _sigmoid(x: float) -> float:
    # Split by sign so exp never overflows for large |x|.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class TAIDScheduler:
    """Moves TAID's interpolation coefficient ``t`` from ``t_start`` towards ``t_end``.

    Call :meth:`step` once per optimizer step with that step's objective ``J_n`` (the TAID KL,
    token-weighted over the whole step and all ranks). The ``n``-th call (from 0) does::

        if J_prev is None:  J_prev = J_n; return          # first call only records
        delta  = (J_prev - J_n) / (J_prev + 1e-15)        # relative improvement
        m      = beta * m + (1 - beta) * delta            # momentum
        dt     = alpha * sigmoid(m) * (1 - t)             # adaptive increment
        t      = min(t_end, max(t_start + (t_end - t_start) * n / N, t + dt))
        J_prev = J_n

    The linear floor guarantees ``t`` reaches ``t_end`` by step ``N``; the adaptive part moves
    faster while the student keeps improving. Since ``sigmoid(m)`` stays near 0.5, the adaptive
    part alone approaches 1 roughly as ``1 - (1 - t_start) * exp(-alpha * n / 2)``, so for runs
    much shorter than ``2 / alpha`` steps ``t`` follows the floor.

    Args:
        t_start: initial ``t`` (0.4 in the paper; 0.2 for smaller capacity gaps).
        t_end: final ``t``, at most 1.
        alpha: step size of the adaptive increment.
        beta: momentum coefficient in [0, 1).
        total_steps: ``N``, the number of optimizer steps of the run (positive).
        adaptive: ``False`` gives the paper's linear ablation: ``t`` is the floor alone.
        alpha_per_run: set ``alpha = alpha_per_run / total_steps`` instead of giving ``alpha``:
            the adaptive part then moves ``t`` as far over this run as the paper's ``alpha``
            moved it over its ~15,600 steps (:data:`PAPER_ALPHA_PER_RUN`, 7.8). Use it when
            the run is much shorter than ``2 / alpha`` steps, where the paper's ``alpha`` leaves
            ``t`` on the linear floor.

    Attributes:
        t: current interpolation coefficient.
        momentum: ``m`` after the last step (for logging).
        dt: the adaptive increment ``alpha * sigmoid(m) * (1 - t)`` of the last step.
        prev_loss: ``J_prev`` (``None`` before the first step).
        num_steps: number of :meth:`step` calls so far.
    """

    def __init__(
        self,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = DEFAULT_ALPHA,
        beta: float = 0.99,
        total_steps: int | None = None,
        adaptive: bool = True,
        alpha_per_run: float | None = None,
    ) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(
                f"total_steps must be a positive int (the number of optimizer steps of the run, "
                f"which sets the linear floor of t), got {total_steps!r}"
            )
        if alpha_per_run is not None:
            if alpha != DEFAULT_ALPHA:
                raise ValueError(
                    f"give alpha ({alpha}) or alpha_per_run ({alpha_per_run}), not both"
                )
            if not alpha_per_run >= 0.0:
                raise ValueError(f"alpha_per_run must be >= 0, got {alpha_per_run}")
            alpha = alpha_per_run / total_steps
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise ValueError(
                f"need 0 <= t_start <= t_end <= 1, got t_start={t_start}, t_end={t_end}"
            )
        if not alpha >= 0.0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.t_start = float(t_start)
        self.t_end = float(t_end)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.total_steps = total_steps
        self.adaptive = bool(adaptive)
        self.t = self.t_start
        self.momentum = 0.0
        self.dt = 0.0
        self.prev_loss: float | None = None
        self.num_steps = 0

    def floor(self, n: int) -> float:
        """The linear floor ``t_start + (t_end - t_start) * n / N`` at step ``n``."""
        return self.t_start + (self.t_end - self.t_start) * n / self.total_steps

    def step(self, loss: float | Tensor) -> float:
        """Advance ``t`` from the objective of the optimizer step just taken; returns the new ``t``.

        Raises:
            ValueError: ``loss`` is not finite (the state is left unchanged).
        """
        value = float(loss.detach() if isinstance(loss, Tensor) else loss)
        if not math.isfinite(value):
            raise ValueError(
                f"TAIDScheduler.step got a non-finite loss ({value}) at scheduler step "
                f"{self.num_steps}; t stays {self.t}. Check the model outputs for NaN/inf."
            )
        n = self.num_steps
        self.num_steps += 1
        if self.num_steps == self.total_steps + 1:
            warnings.warn(
                f"TAIDScheduler.step was called {self.num_steps} times, more than total_steps="
                f"{self.total_steps}: call it once per optimizer step (not per micro-batch), "
                f"with the whole step's loss, and set total_steps to the run's optimizer steps",
                stacklevel=2,
            )
        if self.prev_loss is None:
            self.prev_loss = value
            if not self.adaptive:
                self.t = min(self.t_end, self.floor(n))
            return self.t
        delta = (self.prev_loss - value) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
        self.dt = self.alpha * _sigmoid(self.momentum) * (1.0 - self.t)
        proposed = self.t + self.dt if self.adaptive else self.floor(n)
        self.t = min(self.t_end, max(self.floor(n), proposed))
        self.prev_loss = value
        return self.t

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values: the state and the settings it was produced under."""
        return {k: getattr(self, k) for k in _CONFIG_KEYS + _STATE_KEYS}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore the state saved by :meth:`state_dict`.

        Args:
            state: a dict from :meth:`state_dict`.
            strict: refuse a state saved under different settings (``t_start``, ``alpha``,
                ``total_steps``, ...): resuming with other settings would not continue the same
                schedule. With ``strict=False`` the state is loaded and this scheduler's
                settings are kept.
        """
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise KeyError(f"TAIDScheduler state is missing {missing}; got keys {sorted(state)}")
        if strict:
            for key in _CONFIG_KEYS:
                if key in state and state[key] != getattr(self, key):
                    raise ValueError(
                        f"TAIDScheduler state was saved with {key}={state[key]!r} but this "
                        f"scheduler has {key}={getattr(self, key)!r}; use the same setting to "
                        f"resume, or load_state_dict(..., strict=False) to keep the new one"
                    )
        self.t = float(state["t"])
        self.momentum = float(state["momentum"])
        self.dt = float(state["dt"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])
        self.num_steps = int(state["num_steps"])

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={getattr(self, k)!r}" for k in _CONFIG_KEYS)
        return f"TAIDScheduler({cfg}; t={self.t:.6f}, step={self.num_steps})"
