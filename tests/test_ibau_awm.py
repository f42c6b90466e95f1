"""I-BAU and AWM: the implicit hypergradient against the exact one, AWM's L1 projection and weight masking,
registration and parameter validation, one-shot clean sets, and backdoor removal end to end."""
import copy

import pytest
import torch
from pydantic import ValidationError

from defenses import DEFENSES
from defenses.awm import AWM, AWMParams, conv_weights, project_l1, scale_l1
from defenses.base import DefenseContext, draw_clean_set
from defenses.ibau import IBAU, IBAUParams, implicit_hypergradient, project_l2
from kernel.data import Split
from kernel.train import TrainConfig
from toys import backdoored_synthetic, defense_setup


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models run fastest on one thread


# ---------------------------------------------------------------------------------------------
# The implicit hypergradient


def _quadratic_problem(d=6, seed=0):
    """Inner: g(δ, θ) = ½ δᵀA(θ)δ − b(θ)ᵀδ, A = I + WWᵀ, so δ*(θ) = A⁻¹b in closed form.
    Inner map: one gradient step on g, Φ(δ) = δ − η(Aδ − b), a contraction for η < 2/λ_max(A).
    Outer: L(δ, θ) = ½‖δ − t‖² + ‖b‖²/10 + Σ W (depends on θ directly and through δ*)."""
    g = torch.Generator().manual_seed(seed)
    W = (0.5 * torch.randn(d, d, generator=g, dtype=torch.float64)).requires_grad_(True)
    b = torch.randn(d, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randn(d, generator=g, dtype=torch.float64)

    def A(W):
        return torch.eye(d, dtype=torch.float64) + W @ W.T

    eta = float(1.0 / torch.linalg.eigvalsh(A(W.detach())).max())

    def inner_map(delta, theta):
        W, b = theta
        return delta - eta * (A(W) @ delta - b)

    def outer_loss(delta, theta):
        W, b = theta
        return 0.5 * (delta - t).pow(2).sum() + b.pow(2).sum() / 10 + W.sum()

    def exact():
        delta_star = torch.linalg.solve(A(W), b)  # differentiable closed form
        return torch.autograd.grad(outer_loss(delta_star, [W, b]), [W, b])

    delta_star = torch.linalg.solve(A(W.detach()), b.detach())
    return outer_loss, inner_map, [W, b], delta_star, exact


def _rel_err(got, want):
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(got, want)) ** 0.5
    return num / sum(float(b.pow(2).sum()) for b in want) ** 0.5


def test_implicit_hypergradient_matches_the_exact_hypergradient():
    outer_loss, inner_map, theta, delta_star, exact = _quadratic_problem()
    want = exact()
    got = implicit_hypergradient(outer_loss, inner_map, theta, delta_star, K=400)
    assert _rel_err(got, want) < 1e-6  # stated tolerance: the Neumann series converged
    # fewer fixed-point iterations: a truncated series, monotonically better with K
    errs = [_rel_err(implicit_hypergradient(outer_loss, inner_map, theta, delta_star, K=k), want) for k in (1, 5, 50)]
    assert errs[0] > errs[1] > errs[2]


def test_implicit_term_matters():
    """Dropping the implicit term (treating δ as a constant) gives a visibly different gradient."""
    outer_loss, inner_map, theta, delta_star, exact = _quadratic_problem(seed=1)
    want = exact()
    d = delta_star.clone().requires_grad_(True)
    constant = torch.autograd.grad(outer_loss(d, theta), theta)  # ∂_θ L only
    assert _rel_err(constant, want) > 0.1
    assert _rel_err(implicit_hypergradient(outer_loss, inner_map, theta, delta_star, K=400), want) < 1e-6


def test_projected_map_gives_the_bounded_problems_hypergradient():
    """Inner: min_δ ½‖δ − Wu‖² over ‖δ‖ ≤ C with ‖Wu‖ > C, so δ*(W) = C·Wu/‖Wu‖ (on the ball's surface).
    The projected step P_C(δ − η(δ − Wu)) has δ* as its fixed point and gives the exact hypergradient; the
    unprojected step (the I-BAU code's map) treats δ* as free to move radially and gets it wrong."""
    g = torch.Generator().manual_seed(2)
    d, C, eta = 5, 1.0, 0.5
    W = torch.randn(d, d, generator=g, dtype=torch.float64).requires_grad_(True)
    u, t = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    assert float((W.detach() @ u).norm()) > 2 * C  # the bound is active

    def outer_loss(delta, theta):
        return 0.5 * (delta - t).pow(2).sum() + theta[0].sum()

    def step(delta, theta):
        return delta - eta * (delta - theta[0] @ u)

    b = W @ u
    want = torch.autograd.grad(outer_loss(C * b / b.norm(), [W]), [W])
    delta_star = (C * b / b.norm()).detach()
    projected = implicit_hypergradient(outer_loss, lambda dl, th: project_l2(step(dl, th), C), [W], delta_star, K=200)
    assert _rel_err(projected, want) < 1e-8
    assert _rel_err(implicit_hypergradient(outer_loss, step, [W], delta_star, K=200), want) > 0.1
    # inside the ball the projection is the identity: both maps agree
    inside = (0.5 * C * b / b.norm()).detach()
    a = implicit_hypergradient(outer_loss, lambda dl, th: project_l2(step(dl, th), 10 * C), [W], inside, K=50)
    assert _rel_err(a, implicit_hypergradient(outer_loss, step, [W], inside, K=50)) < 1e-12


# ---------------------------------------------------------------------------------------------
# AWM's L1 projection


def test_project_l1_onto_the_ball_and_identity_inside():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 3, 8, 8, generator=g)
    r = 0.3 * float(v.abs().sum())
    p = project_l1(v, r)
    assert abs(float(p.abs().sum()) - r) < 1e-3 * r
    assert p.shape == v.shape and bool(((p == 0) | (p.sign() == v.sign())).all())
    # the closest point of the ball: no random point of the ball is closer to v
    dist = float((v - p).norm())
    for _ in range(200):
        w = project_l1(torch.randn(v.shape, generator=g) * 3, r) * float(torch.rand(1, generator=g))
        assert float((v - w).norm()) >= dist - 1e-5
    inside = v * (0.5 * r / float(v.abs().sum()))
    assert torch.equal(project_l1(inside, r), inside)
    s = scale_l1(v, r)  # the AWM code's rescaling
    assert abs(float(s.abs().sum()) - r) < 1e-3 * r and torch.allclose(s / v, torch.full_like(v, r / float(v.abs().sum())))
    assert torch.equal(scale_l1(inside, r), inside)


# ---------------------------------------------------------------------------------------------
# Registration, parameters, one-shot


def test_registered_with_validated_defaults():
    assert DEFENSES.get("ibau") is IBAU and DEFENSES.get("awm") is AWM
    ib, aw = IBAUParams(), AWMParams()
    assert (ib.rounds, ib.K, ib.lr) == (5, 5, 1e-3)
    assert (ib.portion, ib.augment) == (0.01, False)  # the code's; re-decided in docs/seeds_cifar10.md
    assert (aw.rounds, aw.inner, aw.alpha, aw.beta, aw.gamma, aw.trigger_norm, aw.clean_size) == (10, 5, 0.9, 0.1, 1e-8, 1000.0, 500)
    assert IBAU.uses_clean_set() and AWM.uses_clean_set()
    assert IBAUParams(clean_size="one_shot").clean_size == "one_shot"
    for bad in ({"rounds": 0}, {"K": 0}, {"lr": 0}, {"portion": 1.5}, {"norm_bound": -1}, {"clean_size": 1.5},
                {"clean_size": "two_shot"}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            IBAUParams(**bad)
    for bad in ({"rounds": 0}, {"alpha": -0.1}, {"trigger_norm": 0}, {"projection": "l2"}, {"clean_size": 0},
                {"unknown": 1}):
        with pytest.raises(ValidationError):
            AWMParams(**bad)


@pytest.mark.parametrize("name,params", [
    ("ibau", {"rounds": 1, "K": 2, "batch_size": 16}),
    ("awm", {"rounds": 2, "inner": 1, "batch_size": 16, "min_samples": 16}),
])
def test_one_shot_clean_set_works(name, params):
    info, train, model, ctx = defense_setup()
    cls = DEFENSES.get(name)
    p = cls.Params(clean_size="one_shot", **params)
    ctx.clean = draw_clean_set(train, torch.tensor([], dtype=torch.long), p.clean_size, 0, info.num_classes)
    assert len(ctx.clean) == 10 and set(ctx.clean.y.tolist()) == set(range(10))
    out = cls(p).apply(model, ctx)
    assert all(torch.isfinite(q).all() for q in out.parameters())
    assert len(ctx.history) == p.rounds
    art = ctx.artifacts["perturbation" if name == "ibau" else "trigger"]
    assert art.shape == (3, 32, 32) and float(art.min()) >= 0 and float(art.max()) <= 1


def test_awm_mask_lr_decays_each_round_as_in_the_code():
    info, train, model, ctx = defense_setup(n=32)
    ctx.clean = train
    AWM(AWMParams(clean_size=32, rounds=3, inner=1, batch_size=16, min_samples=16, lr=0.1, lr_decay=0.5)).apply(model, ctx)
    assert [h["mask_lr"] for h in ctx.history] == pytest.approx([0.1, 0.05, 0.025])
    assert AWMParams().lr_decay == 0.9  # the code's ExponentialLR(gamma=0.9), stepped once a round


@pytest.mark.parametrize("min_samples,steps", [(0, 2), (32, 2), (100, 8)])
def test_ibau_min_samples_cycles_the_clean_set(min_samples, steps, monkeypatch):
    """32 clean images in batches of 16: one pass is 2 outer steps; min_samples 100 needs 4 passes.
    The inner maximisation still runs once a round."""
    info, train, model, ctx = defense_setup(n=32)
    ctx.clean = train
    calls, orig = [], IBAU._inner_max
    monkeypatch.setattr(IBAU, "_inner_max", lambda self, *a: (calls.append(1), orig(self, *a))[1])
    IBAU(IBAUParams(clean_size=32, rounds=2, K=1, batch_size=16, min_samples=min_samples)).apply(model, ctx)
    assert [h["outer_steps"] for h in ctx.history] == [steps, steps] and len(calls) == 2


@pytest.mark.parametrize("projected", [False, True])
def test_ibau_projected_map_projects_inside_the_hypergradient(projected, monkeypatch):
    """projected_map puts the L2 projection inside the fixed-point map: one differentiable projection per
    outer step (grad enabled), besides the inner maximisation's (under no_grad); off, only the latter."""
    import defenses.ibau as ibau_mod
    info, train, model, ctx = defense_setup(n=32)
    ctx.clean = train
    in_graph, orig = [], ibau_mod.project_l2
    monkeypatch.setattr(ibau_mod, "project_l2", lambda d, c: (in_graph.append(torch.is_grad_enabled()), orig(d, c))[1])
    IBAU(IBAUParams(clean_size=32, rounds=2, K=1, batch_size=16, norm_bound=0.5, projected_map=projected)).apply(model, ctx)
    assert sum(in_graph) == (2 * 2 if projected else 0)  # 2 rounds x 2 outer steps
    assert len(in_graph) - sum(in_graph) == 2 * 2  # the inner passes' projections: 2 rounds x 2 batches


@pytest.mark.parametrize("name,params", [
    ("ibau", {"rounds": 1, "K": 1, "batch_size": 16}),
    ("awm", {"rounds": 1, "inner": 1, "batch_size": 16, "min_samples": 16, "lr": 0.1}),
])
def test_teacher_clean_target_ignores_the_clean_labels(name, params):
    """clean_target 'teacher' fits the backdoored model's own softmax, so relabelling the clean set
    changes nothing; with 'label' (the papers) the same relabelling changes the result."""
    cls = DEFENSES.get(name)

    def run(target, shift):
        info, train, model, ctx = defense_setup(n=32)
        ctx.clean = Split(train.x, (train.y + shift) % 10)
        out = cls(cls.Params(clean_size=32, clean_target=target, **params)).apply(model, ctx)
        return torch.cat([q.detach().flatten() for q in out.parameters()])

    assert torch.equal(run("teacher", 0), run("teacher", 3))
    assert not torch.equal(run("label", 0), run("label", 3))


@pytest.mark.parametrize("trigger_inner,calls", [(None, 4), (3, 12)])
def test_awm_trigger_inner_sizes_the_trigger_phase(trigger_inner, calls, monkeypatch):
    """32 images, batch 16: each phase has ceil(32/16) = 2 batches per inner iteration; the trigger phase
    alone takes trigger_inner of them (one L1 projection per step), the mask phase keeps inner."""
    import defenses.awm as awm_module
    count, orig = [], awm_module.project_l1
    monkeypatch.setattr(awm_module, "project_l1", lambda v, r: (count.append(1), orig(v, r))[1])
    info, train, model, ctx = defense_setup(n=32)
    ctx.clean = train
    AWM(AWMParams(clean_size=32, rounds=2, inner=1, batch_size=16, min_samples=16,
                  trigger_inner=trigger_inner)).apply(model, ctx)
    assert len(count) == calls


def test_awm_returns_masked_weights_and_keeps_everything_else():
    info, train, model, ctx = defense_setup(n=64)
    ctx.clean = train
    before = copy.deepcopy(model.state_dict())
    conv = set(conv_weights(model))
    # a large mask learning rate, so that masks move a lot and hit both clip bounds
    out = AWM(AWMParams(clean_size=64, rounds=2, inner=2, batch_size=32, min_samples=32, lr=0.5)).apply(model, ctx)
    after = out.state_dict()
    assert conv and set(after) == set(before)
    moved = 0
    for k, w0 in before.items():
        w1 = after[k]
        if k not in conv:
            assert torch.equal(w1, w0), k  # BatchNorm, linear, Normalize: untouched
            continue
        nz = w0 != 0
        ratio = w1[nz] / w0[nz]  # the baked mask m = (m ⊙ θ) / θ
        assert float(ratio.min()) >= -1e-6 and float(ratio.max()) <= 1 + 1e-6, k  # m in [0, 1]
        assert torch.equal(w1[~nz], w0[~nz])
        moved += int((ratio < 1 - 1e-6).sum())
    assert moved > 0  # the masks did change something


# ---------------------------------------------------------------------------------------------
# End to end on the embedded synthetic dataset


def _defend(name, params, ds, poisoned, model):
    cls = DEFENSES.get(name)
    p = cls.Params(**params)
    ctx = DefenseContext(info=ds.info, train_cfg=TrainConfig(), seed=0, device=torch.device("cpu"))
    ctx.clean = draw_clean_set(ds.train, poisoned.indices, p.clean_size, 0, ds.info.num_classes)
    return cls(p).apply(copy.deepcopy(model), ctx)


@pytest.fixture(scope="module")
def synthetic_backdoor():
    return backdoored_synthetic(5000, 20)


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param("ibau", marks=pytest.mark.xfail(
        reason="measured: synthetic BadNets CA 91.4 -> 70.4, ASR 99.3 -> 91.0 with the defaults of that time (portion "
               "0.1, augment; docs/ibau_awm_probes.md); it fails at the code's values (today's defaults) too",
        strict=False)),
    pytest.param("awm", marks=pytest.mark.xfail(
        reason="measured: synthetic BadNets ASR 99.4 -> 81.1 (rounds 20), 85.8 with trigger_norm 100 (docs/ibau_awm_probes.md)",
        strict=False)),
])
def test_defense_removes_a_synthetic_backdoor_with_defaults(name, synthetic_backdoor):
    """The quickstart-sized backdoor (5,000 images, 20 epochs: CA 91%, ASR 99%) and each defense at its
    defaults with 500 clean images: ASR down to a quarter of what it was, CA within 10 points. (Minutes.)

    There is no fast unmarked variant: on the 2-core machine a synthetic model small enough to train in
    seconds (1,500 images, 6 epochs) learnt the trigger (ASR 99.6%) but not the task (CA 18%), so no
    defense result on it means anything (measured: docs/ibau_awm_probes.md)."""
    from kernel.metrics import evaluate

    ds, poisoned, trig, model = synthetic_backdoor
    before = evaluate(model, ds.test.x, ds.test.y, trig)
    assert before["asr"] > 0.9, before
    after = evaluate(_defend(name, {"clean_size": 500}, ds, poisoned, model), ds.test.x, ds.test.y, trig)
    assert after["asr"] <= 0.25 * before["asr"], (name, before, after)
    assert after["clean_acc"] >= before["clean_acc"] - 0.10, (name, before, after)
