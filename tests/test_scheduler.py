"""TAIDScheduler: the paper's momentum rule with a linear floor (shared/TAID.md section 3)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from taid import TAIDScheduler


def rule(losses, *, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, total_steps, adaptive=True):
    """The rule written out once more, straight from the paper, for comparison."""
    t, m, prev, ts = t_start, 0.0, None, []
    for n, J in enumerate(losses):
        if prev is None:
            prev = J
            ts.append(t)
            continue
        delta = (prev - J) / (prev + 1e-15)
        m = beta * m + (1 - beta) * delta
        dt = alpha * (1 / (1 + math.exp(-m))) * (1 - t)
        floor = t_start + (t_end - t_start) * n / total_steps
        t = min(t_end, max(floor, t + dt)) if adaptive else min(t_end, floor)
        prev = J
        ts.append(t)
    return ts


def noisy_losses(n, seed=0):
    rng = random.Random(seed)
    return [3.0 * math.exp(-k / 40) + 0.3 + 0.2 * rng.random() for k in range(n)]


def test_first_call_only_records_the_loss():
    s = TAIDScheduler(total_steps=10, alpha=0.5)
    assert s.step(2.5) == 0.4
    assert s.t == 0.4 and s.prev_loss == 2.5 and s.num_steps == 1 and s.momentum == 0.0


def test_trajectory_matches_rule_on_noisy_losses():
    losses = noisy_losses(300)
    # alpha large enough that the adaptive part outruns the floor
    s = TAIDScheduler(t_start=0.2, alpha=0.05, beta=0.9, total_steps=1000)
    ours = [s.step(J) for J in losses]
    expected = rule(losses, t_start=0.2, alpha=0.05, beta=0.9, total_steps=1000)
    assert ours == pytest.approx(expected, rel=0, abs=1e-12)
    floors = [0.2 + 0.8 * n / 1000 for n in range(300)]
    assert any(t > f + 1e-3 for t, f in zip(ours, floors)), "adaptive part never used"


def test_hand_computed_second_step():
    s = TAIDScheduler(t_start=0.4, alpha=0.1, beta=0.5, total_steps=1000)
    s.step(2.0)
    s.step(1.0)
    m = 0.5 * 0.5  # beta * 0 + (1 - beta) * (2 - 1) / 2
    dt = 0.1 * (1 / (1 + math.exp(-m))) * 0.6
    assert s.momentum == pytest.approx(m)
    assert s.dt == pytest.approx(dt)
    assert s.t == pytest.approx(0.4 + dt)


def test_floor_dominates_short_runs_at_paper_defaults():
    N = 200
    s = TAIDScheduler(total_steps=N)
    ts = [s.step(J) for J in noisy_losses(N)]
    for n, t in enumerate(ts[1:], start=1):
        assert t == pytest.approx(0.4 + 0.6 * n / N, abs=1e-12)


@pytest.mark.parametrize("total_steps,t_start", [(600, 0.4), (37, 0.2)])
def test_with_alpha_at_most_one_over_n_the_adaptive_rule_is_exactly_the_linear_one(
    total_steps, t_start
):
    # dt = alpha * sigmoid(m) * (1 - t) < alpha * (1 - t_start) while t >= t_start, and the
    # floor rises by (1 - t_start) / N per step: with alpha <= 1 / N, t is the floor at every
    # step, bit for bit (the paper's alpha 5e-4 in runs of up to 2,000 steps). Losses halving
    # every step drive the momentum, and with it dt, as high as positive losses can.
    bound = 1 / total_steps
    halving = [10.0 * 0.5**k for k in range(total_steps)]

    def ts(alpha, adaptive):
        s = TAIDScheduler(t_start=t_start, alpha=alpha, total_steps=total_steps, adaptive=adaptive)
        return [s.step(J) for J in halving]

    assert ts(bound, True) == ts(bound, False)
    # above the bound the momentum term lifts t off the floor
    assert any(a > b for a, b in zip(ts(4 * bound, True), ts(4 * bound, False)))


def test_t_is_monotone_and_clipped_at_t_end_even_when_loss_rises():
    s = TAIDScheduler(t_start=0.1, t_end=0.9, alpha=0.3, total_steps=50)
    rising = [1.0 + 0.1 * k for k in range(80)]
    ts = [s.step(J) for J in rising]
    assert all(b >= a for a, b in zip(ts, ts[1:]))
    assert max(ts) == pytest.approx(0.9)
    assert ts[-1] == 0.9


def test_linear_ablation_follows_the_floor_exactly():
    N = 40
    s = TAIDScheduler(t_start=0.2, alpha=0.5, total_steps=N, adaptive=False)
    ts = [s.step(J) for J in noisy_losses(60)]
    for n, t in enumerate(ts):
        assert t == pytest.approx(min(1.0, 0.2 + 0.8 * n / N), abs=1e-12)


def test_state_round_trip_continues_identically():
    losses = noisy_losses(60, seed=3)
    a = TAIDScheduler(alpha=0.05, total_steps=100)
    for J in losses[:30]:
        a.step(J)
    state = a.state_dict()
    assert all(isinstance(v, (int, float, bool, type(None))) for v in state.values())
    b = TAIDScheduler(alpha=0.05, total_steps=100)
    b.load_state_dict(state)
    assert [a.step(J) for J in losses[30:]] == [b.step(J) for J in losses[30:]]
    assert a.state_dict() == b.state_dict()


def test_loading_state_saved_under_other_settings_is_refused_unless_not_strict():
    a = TAIDScheduler(total_steps=100)
    a.step(1.0)
    b = TAIDScheduler(total_steps=200)
    with pytest.raises(ValueError, match="total_steps=100.*total_steps=200"):
        b.load_state_dict(a.state_dict())
    b.load_state_dict(a.state_dict(), strict=False)
    assert b.num_steps == 1 and b.total_steps == 200


def test_non_finite_loss_is_refused_and_state_kept():
    s = TAIDScheduler(total_steps=10)
    s.step(1.0)
    before = s.state_dict()
    with pytest.raises(ValueError, match="non-finite loss.*step 1"):
        s.step(float("nan"))
    assert s.state_dict() == before


def test_accepts_scalar_tensors():
    s = TAIDScheduler(alpha=0.1, total_steps=10)
    s.step(torch.tensor(2.0, requires_grad=True))
    t = s.step(torch.tensor(1.0))
    assert isinstance(t, float) and t > 0.4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": None}, "total_steps"),
        ({"total_steps": 10, "t_start": 0.9, "t_end": 0.5}, "t_start <= t_end"),
        ({"total_steps": 10, "t_end": 1.5}, "t_end"),
        ({"total_steps": 10, "beta": 1.0}, "beta"),
        ({"total_steps": 10, "alpha": -1.0}, "alpha"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TAIDScheduler(**kwargs)


def test_extreme_momentum_does_not_overflow():
    s = TAIDScheduler(alpha=0.1, beta=0.0, total_steps=10)
    s.step(1e-12)
    s.step(1e30)  # delta ~ -1e42: sigmoid must not overflow
    assert math.isfinite(s.t) and s.dt >= 0.0


def test_where_t_ends_is_what_the_docs_say():
    """docs/math.md: steps 0 and 1 train at t_start, the last of N at (N - 2) / N of the way,
    and after N calls t = 1 - (1 - t_start) / N (the floor dominating)."""
    N = 10
    s = TAIDScheduler(t_start=0.4, total_steps=N, alpha=0.0)
    used = []
    for _ in range(N):
        used.append(s.t)  # the t the step trains with
        s.step(1.0)
    assert used[0] == used[1] == 0.4
    assert used[-1] == pytest.approx(0.4 + 0.6 * (N - 2) / N)
    assert s.t == pytest.approx(1 - 0.6 / N)


def test_alpha_per_run_gives_a_run_of_any_length_the_papers_schedule_shape():
    from taid import TAIDLoss
    from taid.scheduler import PAPER_ALPHA_PER_RUN

    scaled = TAIDScheduler(total_steps=150, alpha_per_run=PAPER_ALPHA_PER_RUN)
    assert scaled.alpha == pytest.approx(7.8 / 150)
    explicit = TAIDScheduler(total_steps=150, alpha=7.8 / 150)
    losses = [3.0 * 0.99**i for i in range(150)]
    assert [scaled.step(j) for j in losses] == [explicit.step(j) for j in losses]
    # the shape: the adaptive part alone has brought t far above the floor by mid-run
    half = TAIDScheduler(total_steps=150, alpha_per_run=7.8)
    paper = TAIDScheduler(total_steps=150)
    for j in losses[:75]:
        half.step(j)
        paper.step(j)
    assert half.t > paper.t + 0.2 and paper.t == pytest.approx(paper.floor(74))
    assert TAIDLoss(total_steps=10, alpha_per_run=7.8).scheduler.alpha == pytest.approx(0.78)
    with pytest.raises(ValueError, match="not both"):
        TAIDScheduler(total_steps=10, alpha=1e-3, alpha_per_run=7.8)
