"""Loss modules and the registry."""

from __future__ import annotations

import pytest
import torch

import taid
from taid import LOSSES, TAIDLoss, build_loss
from taid import functional as TF
from taid.divergences import DIVERGENCES


def inputs(seed=0, shape=(2, 9), V=31, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, V, generator=g)
    z = torch.randn(*shape, V, generator=g)
    labels = torch.randint(0, V, shape, generator=g)
    labels[:, :3] = ignore_index
    return s, z, labels


def test_the_registry_is_every_described_divergence_and_sft():
    assert list(LOSSES) == [*DIVERGENCES, "ctkd", "sft"]
    for name, spec in DIVERGENCES.items():
        assert LOSSES[name].__name__ == spec.class_name and LOSSES[name].divergence == name
        assert getattr(taid, spec.class_name) is LOSSES[name]
        assert callable(getattr(TF, spec.function))
        assert callable(getattr(TF, f"fused_linear_{spec.function}"))


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid names: taid, fkl.*sft.*Did you mean 'fkl'"):
        build_loss("fk1")


def test_unknown_keyword_names_what_is_accepted():
    with pytest.raises(ValueError, match=r"does not take \['temprature'\].*t_start"):
        build_loss("taid", total_steps=10, temprature=2.0)
    with pytest.raises(ValueError, match=r"does not take \['temperature'\]"):
        build_loss("sft", temperature=2.0)
    with pytest.raises(ValueError, match="does not take"):
        build_loss("sft", distill_weight=0.5)


@pytest.mark.parametrize("name", [n for n in DIVERGENCES if n != "taid"])
def test_modules_equal_their_functions(name):
    spec = DIVERGENCES[name]
    fn = getattr(TF, spec.function)
    params = {p.name: 0.5 * (p.low + p.example()) for p in spec.params}  # not the defaults
    s, z, labels = inputs(ignore_index=7)
    module = build_loss(name, ignore_index=7, **params)
    torch.testing.assert_close(module(s, z, labels), fn(s, z, labels, ignore_index=7, **params))


def test_defaults_follow_the_paper():
    assert build_loss("jsd").beta == 0.1
    assert build_loss("skl").alpha == 0.1
    assert build_loss("srkl").alpha == 0.1
    assert build_loss("akl").mu == 0.5
    sched = build_loss("taid", total_steps=5).scheduler
    assert (sched.t_start, sched.t_end, sched.alpha, sched.beta) == (0.4, 1.0, 5e-4, 0.99)


def test_taid_module_uses_current_t_and_forward_never_changes_state():
    s, z, labels = inputs()
    loss_fn = TAIDLoss(t_start=0.3, total_steps=10)
    before = loss_fn.state_dict()
    out = loss_fn(s, z, labels)
    loss_fn(s, z, labels)
    assert loss_fn.state_dict() == before
    torch.testing.assert_close(out, TF.taid_loss(s, z, labels, t=0.3))


def test_taid_step_advances_t_and_state_dict_restores_it():
    s, z, labels = inputs()
    a = TAIDLoss(alpha=0.05, total_steps=100)
    for k in range(5):
        a.step(a.compute(s * (1 + 0.1 * k), z, labels).distill)
    assert a.t > 0.4
    b = TAIDLoss(alpha=0.05, total_steps=100)
    b.load_state_dict(a.state_dict())
    assert b.t == a.t and b.scheduler.state_dict() == a.scheduler.state_dict()
    torch.testing.assert_close(b(s, z, labels), a(s, z, labels))


def test_taid_state_survives_torch_save(tmp_path):
    a = TAIDLoss(alpha=0.05, total_steps=100)
    a.step(2.0)
    a.step(1.0)
    torch.save(a.state_dict(), tmp_path / "loss.pt")
    b = TAIDLoss(alpha=0.05, total_steps=100)
    b.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=True))
    assert b.t == a.t and b.scheduler.prev_loss == 1.0


def test_taid_accepts_a_scheduler_instance():
    sched = taid.TAIDScheduler(t_start=0.2, total_steps=3, adaptive=False)
    loss_fn = TAIDLoss(sched)
    assert loss_fn.scheduler is sched
    for J in (3.0, 2.0, 1.0):
        loss_fn.step(J)
    assert loss_fn.t == pytest.approx(0.2 + 0.8 * 2 / 3)


def test_static_losses_have_a_no_op_step():
    loss_fn = build_loss("fkl")
    assert loss_fn.step(1.0) is None
    assert loss_fn.state_dict() == {}


@pytest.mark.parametrize("name", ["taid", "fkl", "jsd", "akl"])
def test_ce_mixing_is_a_convex_combination(name):
    s, z, labels = inputs(ignore_index=3)
    kw = {"total_steps": 10} if name == "taid" else {}
    mixed = build_loss(name, distill_weight=0.3, ignore_index=3, **kw)
    pure = build_loss(name, ignore_index=3, **kw)
    out = mixed.compute(s, z, labels)
    ce = TF.cross_entropy(s, labels, ignore_index=3)
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.distill, pure(s, z, labels))
    torch.testing.assert_close(out.loss, 0.7 * ce + 0.3 * pure(s, z, labels))
    assert out.num_tokens.item() == int((labels != 3).sum())


def test_no_hidden_ce_by_default():
    s, z, labels = inputs()
    out = build_loss("fkl").compute(s, z, labels)
    assert out.ce is None
    torch.testing.assert_close(out.loss, TF.forward_kl(s, z, labels))


def test_mixing_needs_labels():
    s, z, _ = inputs()
    with pytest.raises(ValueError, match="needs labels"):
        build_loss("fkl", distill_weight=0.5)(s, z)


def test_sft_is_cross_entropy_and_ignores_the_teacher():
    s, z, labels = inputs(ignore_index=0)
    sft = build_loss("sft", ignore_index=0)
    ref = torch.nn.functional.cross_entropy(s.reshape(-1, 31), labels.reshape(-1), ignore_index=0)
    torch.testing.assert_close(sft(s, None, labels), ref)
    torch.testing.assert_close(sft(s, z, labels), ref)
    out = sft.compute(s, z, labels)
    assert out.distill is None


def test_sum_reduction_and_token_count_for_global_normalisation():
    s, z, labels = inputs()
    loss_fn = build_loss("taid", total_steps=10, reduction="sum")
    out = loss_fn.compute(s, z, labels)
    mean = TF.taid_loss(s, z, labels, t=0.4)
    torch.testing.assert_close(out.loss / out.num_tokens, mean)


def test_vocab_size_through_the_module():
    s, z, labels = inputs(V=40)
    loss_fn = build_loss("fkl", vocab_size=32)
    torch.testing.assert_close(
        loss_fn(s, z[..., :35], labels), TF.forward_kl(s[..., :32], z[..., :32], labels)
    )


def test_bad_module_settings():
    with pytest.raises(ValueError, match="distill_weight"):
        build_loss("fkl", distill_weight=1.5)
    with pytest.raises(ValueError, match="beta"):
        build_loss("jsd", beta=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        build_loss("taid")
    with pytest.raises(ValueError, match="reduction"):
        build_loss("rkl", reduction="batchmean")


def test_loss_parameters_lists_defaults():
    params = taid.loss_parameters("jsd")
    assert params["beta"].default == 0.1
    assert {"distill_weight", "ignore_index", "reduction", "vocab_size"} <= set(params)
    assert "distill_weight" not in taid.loss_parameters("sft")


def test_repr_shows_the_settings():
    assert "t=0.4" in repr(build_loss("taid", total_steps=3))
    assert "beta=0.1" in repr(build_loss("jsd"))


NEW_DIVERGENCE = r'''
import math, torch
import taid
from taid import divergences as D

def squared_hellinger(s, z, *, gamma, need_grad=False):
    """gamma * sum (sqrt p - sqrt q)^2, written as its forward formula only."""
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(z, -1)
    return gamma * ((0.5 * log_p).exp() - (0.5 * log_q).exp()).pow(2).sum(-1), None

taid.register_divergence(D.Divergence(
    "hel", "hellinger", "HellingerLoss", "gamma * sum (sqrt p - sqrt q)^2", squared_hellinger,
    (D.Param("gamma", low=0.0, high=math.inf, low_open=True, default=1.0, doc="scale"),),
    analytic=False))

from taid import functional as TF
from taid.config import ConfigError, load_config

g = torch.Generator().manual_seed(0)
s = torch.randn(3, 5, 11, generator=g, dtype=torch.float64).float()
z = torch.randn(3, 5, 11, generator=g)
labels = torch.randint(0, 11, (3, 5), generator=g)
labels[0, :2] = -100
p, q = z.double().softmax(-1), s.double().softmax(-1)
ref_rows = 0.5 * (p.sqrt() - q.sqrt()).pow(2).sum(-1)
valid = labels != -100
ref = ref_rows[valid].mean()

for impl in ("eager", "chunked"):
    x = s.clone().requires_grad_(True)
    out = TF.hellinger(x, z, labels, gamma=0.5, implementation=impl, chunk_size=4)
    assert abs(out.item() - ref.item()) < 1e-6, (impl, out.item(), ref.item())
    out.backward()
    xr = s.double().clone().requires_grad_(True)
    r = 0.5 * (p.sqrt() - xr.softmax(-1).sqrt()).pow(2).sum(-1)[valid].mean()
    r.backward()
    assert torch.allclose(x.grad.double(), xr.grad, atol=1e-6), impl

h = torch.randn(3, 5, 4, generator=g).requires_grad_(True)
w = torch.randn(11, 4, generator=g).requires_grad_(True)
fused = TF.fused_linear_hellinger(h, w, z, labels, gamma=0.5)
assert torch.allclose(fused, TF.hellinger(h @ w.T, z, labels, gamma=0.5), atol=1e-6)
loss = taid.build_loss("hel", gamma=0.5)
assert type(loss).__name__ == "HellingerLoss" and taid.HellingerLoss is type(loss)
assert torch.allclose(loss(s, z, labels), ref.float(), atol=1e-6)
base = ["data.path=x.jsonl", "teacher.name_or_path=x", "student.name_or_path=x",
        "loss.name=hel"]
assert load_config(None, base + ["loss.gamma=2"]).loss.params == {"gamma": 2.0}
for bad, match in (("loss.gamma=-1", "gamma must be in"), ("loss.beta=1", "loss.beta")):
    try:
        load_config(None, base + [bad])
    except ConfigError as e:
        assert match in str(e), e
    else:
        raise AssertionError(bad)
print("ok")
'''


def test_a_new_divergence_is_one_function_and_one_description(tmp_path):
    """CONTRIBUTING.md's recipe (here registered at run time, as a user's project would): a
    forward formula and a description give the functional
    wrappers (logits and fused), the module, the registry entry and config validation; the
    chunked paths use autograd per chunk and equal a float64 reference."""
    import os
    import subprocess
    import sys

    script = tmp_path / "new_divergence.py"
    script.write_text(NEW_DIVERGENCE)
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------
# CTKD: forward KL at a learned temperature, trained adversarially
# ------------------------------------------------------------------------------------------
def test_ctkd_is_forward_kl_at_its_temperature_with_the_gradient_reversed():
    s, z, labels = inputs(seed=3)
    loss_fn = build_loss("ctkd", total_steps=10)
    loss_fn.num_steps = 5  # lambda = 0.5 half-way along the curriculum
    assert loss_fn.grl_lambda() == pytest.approx(0.5)
    tau = float(loss_fn.current_temperature().detach())
    assert tau == pytest.approx(1.0 + 20.0 * torch.sigmoid(torch.tensor(1.0)).item())
    x = s.clone().requires_grad_(True)
    out = loss_fn(x, z, labels)
    want = TF.forward_kl(s, z, labels, temperature=tau, temperature_scaling=True)
    torch.testing.assert_close(out.detach(), want, rtol=1e-4, atol=1e-6)
    out.backward()
    # the same loss without the reversal, differentiated w.r.t. theta directly
    theta = loss_fn.theta.detach().clone().requires_grad_(True)
    plain = TF.forward_kl(
        s, z, labels, temperature=1.0 + 20.0 * torch.sigmoid(theta), temperature_scaling=True
    )
    (grad,) = torch.autograd.grad(plain, theta)
    assert grad.abs() > 0
    torch.testing.assert_close(loss_fn.theta.grad, -0.5 * grad)


def test_ctkd_curriculum_and_state():
    loss_fn = build_loss("ctkd", total_steps=4, lambda_min=0.0, lambda_max=1.0)
    lambdas = []
    for _ in range(5):
        lambdas.append(loss_fn.advance(0.0)["grl_lambda"])
    assert lambdas == pytest.approx([0.0, 0.1464466, 0.5, 0.8535534, 1.0], abs=1e-6)
    state = loss_fn.state_dict()
    other = build_loss("ctkd", total_steps=4)
    other.load_state_dict(state)
    assert other.num_steps == 5 and other.grl_lambda() == 1.0
    with pytest.raises(ValueError, match=r"does not take \['temperature'\]"):
        build_loss("ctkd", total_steps=4, temperature=2.0)
    with pytest.raises(ValueError, match="learns its temperature"):
        taid.CTKDLoss(total_steps=4, temperature=2.0)
