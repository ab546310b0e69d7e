"""A deliberately naive float64 reference for every loss, shared by the test files.

It loops over positions, builds each distribution with explicit exp/sum in float64, and skips
vocabulary slots whose weight is exactly zero (0 * log 0 = 0). Gradients come from autograd
through this float64 code, so a wrong analytic gradient in the library cannot hide.
"""

from __future__ import annotations

import torch

from taid.divergences import DIVERGENCES

# Hyperparameters used in the tests: away from the defaults where chosen here, else a valid
# example value from each divergence's description (a new divergence needs no entry).
_CHOSEN = {"taid": {"t": 0.37}, "jsd": {"beta": 0.3}, "skl": {"alpha": 0.2}, "srkl": {"alpha": 0.2}}
PARAMS = {name: _CHOSEN.get(name, spec.examples()) for name, spec in DIVERGENCES.items()}


# ------------------------------------------------------------------------------------------
def _softmax(x: torch.Tensor) -> torch.Tensor:
    finite = x[torch.isfinite(x)]
    e = torch.exp(x - finite.max())  # exp(-inf) = 0
    return e / e.sum()


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over a > 0 of a * (log a - log b)."""
    keep = a > 0
    return (a[keep] * (torch.log(a[keep]) - torch.log(b[keep]))).sum()


def _ref_row(name: str, s: torch.Tensor, z: torch.Tensor, params: dict, label=None) -> torch.Tensor:
    q = _softmax(s)
    p = _softmax(z)
    if name == "taid":
        t = params["t"]
        sd = s.detach()
        both_inf = torch.isinf(sd) & torch.isinf(z)
        # a side with weight exactly 0 contributes 0, even at a -inf slot (t = 1 is forward KL)
        student_part = torch.zeros_like(sd) if t == 1 else (1 - t) * sd
        teacher_part = torch.zeros_like(z) if t == 0 else t * z
        mixed = torch.where(both_inf, sd, student_part + teacher_part)
        pt = _softmax(mixed)
        return _kl(pt, q)
    if name == "fkl":
        return _kl(p, q)
    if name == "rkl":
        return _kl(q, p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum()
    if name == "jsd":
        b = params["beta"]
        m = b * p + (1 - b) * q
        return b * _kl(p, m) + (1 - b) * _kl(q, m)
    if name == "skl":
        a = params["alpha"]
        return _kl(p, a * p + (1 - a) * q)
    if name == "srkl":
        a = params["alpha"]
        return _kl(q, (1 - a) * p + a * q)
    if name == "akl":
        mu = params["mu"]
        order = sorted(range(len(p)), key=lambda i: -p[i].item())
        head = torch.zeros(len(p), dtype=torch.bool)
        mass = 0.0
        for i in order:
            if mass < mu:
                head[i] = True
            mass += p[i].item()
        gap = (p - q).abs().detach()
        gh, gt = gap[head].sum(), gap[~head].sum()
        wh, wt = gh / (gh + gt), gt / (gh + gt)
        return wh * _kl(p, q) + wt * _kl(q, p)
    if name == "dkd":
        # binary target / rest distributions, and the distributions over the other tokens
        y = int(label)
        rest = torch.ones(len(p), dtype=torch.bool)
        rest[y] = False
        b_p = torch.stack([p[y], p[rest].sum()])
        b_q = torch.stack([q[y], q[rest].sum()])
        p_hat, q_hat = p[rest] / p[rest].sum(), q[rest] / q[rest].sum()
        return params["alpha"] * _kl(b_p, b_q) + params["beta"] * _kl(p_hat, q_hat)
    raise KeyError(
        f"no naive float64 reference for divergence {name!r}: add its formula to "
        f"tests/reference.py (_ref_row); every loss is checked against one"
    )


def reference(
    name,
    student,
    teacher,
    labels,
    params,
    ignore_index=-100,
    reduction="mean",
    temperature=1.0,
    temperature_scaling=False,
):
    """Loss of float64 copies, looping over every position; the divergence sees the logits
    divided by ``temperature`` (times its square with ``temperature_scaling``)."""
    V = student.shape[-1]
    s_all = student.reshape(-1, V) / temperature
    z_all = teacher.detach().double().reshape(-1, V) / temperature
    factor = temperature**2 if temperature_scaling else 1.0
    lab = None if labels is None else labels.reshape(-1)
    per_pos = []
    for i in range(s_all.shape[0]):
        if lab is not None and lab[i].item() == ignore_index:
            per_pos.append(s_all.new_zeros(()))
        else:
            label = None if lab is None else lab[i]
            per_pos.append(factor * _ref_row(name, s_all[i], z_all[i], params, label))
    per_pos = torch.stack(per_pos)
    n_valid = s_all.shape[0] if lab is None else int((lab != ignore_index).sum())
    if reduction == "sum":
        return per_pos.sum()
    if reduction == "mean":
        return per_pos.sum() / max(n_valid, 1)
    return per_pos.reshape(student.shape[:-1])


def make_inputs(
    shape, V, *, dtype=torch.float32, ignore_index=42, mask_frac=0.25, seed=0, scale=3.0
):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(*shape, V, generator=g)).to(dtype)
    teacher = (scale * torch.randn(*shape, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, shape, generator=g)
    labels[labels == ignore_index] = (ignore_index + 1) % V
    masked = torch.rand(shape, generator=g) < mask_frac
    labels[masked] = ignore_index
    return student, teacher, labels
