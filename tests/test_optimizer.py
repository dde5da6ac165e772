"""Tests of :class:`marglik.optim.KFACOptimizer` (fast, CPU)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marglik import KFAC, DiagonalBlock, KronBlock, UnsupportedModuleError
from marglik.optim import KFACOptimizer


# ----------------------------------------------------------------------------------------- helpers
class TokenNet(nn.Module):
    """Weight sharing over T tokens: Linear on (N, T, D), mean over tokens, Linear head."""

    def __init__(self, d: int = 4, h: int = 5, c: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(d, h)
        self.head = nn.Linear(h, c)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)).mean(1))


class GroupedConvNet(nn.Module):
    """Grouped Conv1d (2 groups) + LayerNorm + Linear head: Kronecker factors with G = 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, groups=2)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # (N, 4, L)
        h = torch.tanh(self.conv(x)).mean(-1)
        return self.head(self.norm(h))


def one_step(model, opt, X, y, loss_fn=None):
    """zero_grad / track / update_factors / backward / step; returns the parameter change p_old - p_new."""
    old = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    with opt.track():
        out = model(X)
    opt.update_factors(out, y)
    loss = (loss_fn or F.cross_entropy)(out, y)
    loss.backward()
    opt.step()
    return [o - p.detach() for o, p in zip(old, model.parameters())], loss.item()


def dense_reference(opt, layer, damping, rule):
    """Dense (curvature + damping) matrix of a layer in [weight.flatten(), bias] order."""
    st = opt.state[layer.key]
    if layer.kind == "diag":
        n = sum(p.numel() for p in layer.params)
        return DiagonalBlock(layer.name, st["D"], layer.weight, layer.bias).to_dense() + damping * torch.eye(n)
    A, B = st["A"], st["B"]
    if rule == "eigen":
        n = sum(p.numel() for p in layer.params)
        return KronBlock(layer.name, A, B, layer.weight, layer.bias).to_dense() + damping * torch.eye(n)
    da, db = A.shape[-1], B.shape[-1]
    pis = []
    for g in range(A.shape[0]):  # factored Tikhonov damping, per group
        pis.append(math.sqrt((A[g].trace() / da) / (B[g].trace() / db)))
    pi = torch.tensor(pis).view(-1, 1, 1)
    s = math.sqrt(damping)
    Ad = A + pi * s * torch.eye(da)
    Bd = B + s / pi * torch.eye(db)
    return KronBlock(layer.name, Ad, Bd, layer.weight, layer.bias).to_dense()


# ----------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("rule", ["pi", "eigen"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_update_equals_dense_damped_inverse(float64, rule, approx):
    torch.manual_seed(0)
    model = GroupedConvNet()
    X, y = torch.randn(7, 4, 6), torch.randint(0, 3, (7,))
    lam = 0.07
    opt = KFACOptimizer(model, lr=1.0, damping=lam, momentum=0.0, fisher_type="type-2", approx=approx,
                        damping_rule=rule, factor_ema=0.5)
    assert [layer.kind for layer in opt.layers] == ["kron", "diag", "kron"]
    assert opt.layers[0].groups == 2

    # factors equal the engine's fit on the batch, per example (B / N)
    kron = KFAC(model, fisher_type="type-2", approx=approx).fit((X, y))
    delta, _ = one_step(model, opt, X, y)
    for layer, block in zip(opt.layers, kron.blocks):
        st = opt.state[layer.key]
        if layer.kind == "kron":
            torch.testing.assert_close(st["A"], block.A)
            torch.testing.assert_close(st["B"], block.B / 7)
        else:
            torch.testing.assert_close(st["D"], block.blocks / 7)

    params = list(model.parameters())
    for layer in opt.layers:
        g = torch.cat([p.grad.reshape(-1) for p in layer.params])
        d = torch.cat([delta[next(i for i, q in enumerate(params) if q is p)].reshape(-1) for p in layer.params])
        ref = torch.linalg.solve(dense_reference(opt, layer, lam, rule), g)
        torch.testing.assert_close(d, ref, rtol=1e-9, atol=1e-11)


def test_factor_ema_and_update_schedule(float64):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = KFACOptimizer(model, lr=0.1, damping=0.1, fisher_type="type-2", factor_ema=0.8, factor_update_every=2)
    X1, X2, X3 = (torch.randn(5, 3) for _ in range(3))
    y = torch.randint(0, 2, (5,))
    key = opt.layers[0].key
    one_step(model, opt, X1, y)
    A1 = opt.state[key]["A"].clone()
    assert not opt.factors_due  # step 1: no factor update
    with opt.track():
        out = model(X2)
    assert opt.update_factors(out, y) is False
    F.cross_entropy(out, y).backward()
    opt.step()
    torch.testing.assert_close(opt.state[key]["A"], A1)
    assert opt.factors_due
    A3 = KFAC(model, fisher_type="type-2").fit((X3, y)).blocks[0].A  # batch factor at the tracked forward
    one_step(model, opt, X3, y)
    torch.testing.assert_close(opt.state[key]["A"], 0.8 * A1 + 0.2 * A3)
    assert opt.state[key]["factor_updates"] == 2
    assert opt.steps == 3


def test_expand_and_reduce_agree_without_weight_sharing(float64):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    deltas = {}
    for approx in ("expand", "reduce"):
        m = copy.deepcopy(model)
        opt = KFACOptimizer(m, lr=0.5, damping=0.01, approx=approx, fisher_type="type-2")
        deltas[approx], _ = one_step(m, opt, X, y)
    for a, b in zip(deltas["expand"], deltas["reduce"]):
        torch.testing.assert_close(a, b)


def test_expand_and_reduce_differ_with_weight_sharing(float64):
    torch.manual_seed(3)
    model = TokenNet()
    X, y = torch.randn(9, 6, 4), torch.randint(0, 3, (9,))
    deltas = {}
    for approx in ("expand", "reduce"):
        m = copy.deepcopy(model)
        opt = KFACOptimizer(m, lr=0.5, damping=0.01, approx=approx, fisher_type="type-2")
        deltas[approx], _ = one_step(m, opt, X, y)
    # the shared layer's update differs; the head (no sharing: input (N, h)) agrees
    assert (deltas["expand"][0] - deltas["reduce"][0]).abs().max() > 1e-3
    torch.testing.assert_close(deltas["expand"][2], deltas["reduce"][2])


def test_kl_clip_scales_update(float64):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    lr = 0.5
    m0, m1 = copy.deepcopy(model), copy.deepcopy(model)
    d0, _ = one_step(m0, KFACOptimizer(m0, lr=lr, damping=0.01, momentum=0, fisher_type="type-2"), X, y)
    vg = sum(float((d / lr * p.grad).sum()) for d, p in zip(d0, m0.parameters()))
    clip = 1e-3 * lr**2 * vg
    d1, _ = one_step(m1, KFACOptimizer(m1, lr=lr, damping=0.01, momentum=0, fisher_type="type-2", kl_clip=clip), X, y)
    nu = math.sqrt(clip / (lr**2 * vg))
    for a, b in zip(d0, d1):
        torch.testing.assert_close(b, nu * a)


def test_max_grad_norm_clips_raw_gradient(float64):
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    m0, m1 = copy.deepcopy(model), copy.deepcopy(model)
    d0, _ = one_step(m0, KFACOptimizer(m0, lr=0.5, damping=0.01, momentum=0, fisher_type="type-2"), X, y)
    gnorm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in m0.parameters()))
    opt1 = KFACOptimizer(m1, lr=0.5, damping=0.01, momentum=0, fisher_type="type-2", max_grad_norm=0.25 * gnorm)
    d1, _ = one_step(m1, opt1, X, y)
    for a, b in zip(d0, d1):  # the update is linear in the gradient (factors do not depend on it)
        torch.testing.assert_close(b, 0.25 * a, rtol=1e-5, atol=1e-12)


# ----------------------------------------------------------------------------------------- torch integration
def test_state_dict_round_trip(float64):
    torch.manual_seed(5)
    model = TokenNet()
    data = [(torch.randn(8, 5, 4), torch.randint(0, 3, (8,))) for _ in range(6)]
    kw = dict(lr=0.2, damping=0.05, fisher_type="type-2", inverse_update_every=10, momentum=0.9, weight_decay=0.01)
    opt = KFACOptimizer(model, **kw)
    for X, y in data[:3]:
        one_step(model, opt, X, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model2 = TokenNet()
    model2.load_state_dict(ckpt["model"])
    opt2 = KFACOptimizer(model2, **kw)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.steps == 3
    st = opt2.state[opt2.layers[0].key]
    for key in ("A", "B", "A_inv", "B_inv", "factor_updates", "momentum_buffer"):
        assert key in st
    # the next steps (cached inverses from step 0 are reused; momentum carries over) agree exactly
    for X, y in data[3:]:
        one_step(model, opt, X, y)
        one_step(model2, opt2, X, y)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_lr_scheduler_scales_both_groups(float64):
    from marglik.models import PositionalEmbedding

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = PositionalEmbedding(5, 4, std=0.5)  # raw parameter -> first-order fallback
            self.net = TokenNet()

        def forward(self, x):
            return self.net(self.pos(x))

    torch.manual_seed(6)
    model = Net()
    opt = KFACOptimizer(model, lr=0.3, damping=0.1, momentum=0.0, fisher_type="type-2", fallback_lr=0.05)
    assert [g["kind"] for g in opt.param_groups] == ["kfac", "fallback"]
    assert opt.param_groups[1]["params"][0] is model.pos.weight
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5**k)
    X, y = torch.randn(6, 5, 4), torch.randint(0, 3, (6,))
    one_step(model, opt, X, y)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.15)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.025)
    # the same step at the base learning rates, from a copy of model and optimizer
    model_c = copy.deepcopy(model)
    opt_c = KFACOptimizer(model_c, lr=0.3, damping=0.1, momentum=0.0, fisher_type="type-2", fallback_lr=0.05)
    opt_c.load_state_dict(opt.state_dict())
    opt_c.param_groups[0]["lr"], opt_c.param_groups[1]["lr"] = 0.3, 0.05
    d, _ = one_step(model, opt, X, y)
    d_c, _ = one_step(model_c, opt_c, X, y)
    for a, b in zip(d, d_c):
        torch.testing.assert_close(a, 0.5 * b)
    assert d[0].abs().sum() > 0  # the fallback parameter moved


def test_damping_change_recomputes_inverse(float64):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = KFACOptimizer(model, lr=0.1, damping=0.1, fisher_type="type-2", inverse_update_every=100)
    X, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    one_step(model, opt, X, y)
    inv = opt.state[opt.layers[0].key]["A_inv"].clone()
    opt.param_groups[0]["damping"] = 0.5
    one_step(model, opt, X, y)
    assert opt.state[opt.layers[0].key]["inv_damping"] == 0.5
    assert not torch.allclose(opt.state[opt.layers[0].key]["A_inv"], inv)


# ----------------------------------------------------------------------------------------- provable speed-up
def test_linear_least_squares_one_kfac_step_beats_sgd_grid(float64):
    """Ill-conditioned linear regression: the K-FAC (type-2) curvature of a linear model is the exact
    Hessian I ⊗ E[x x^T], so one step with lr = 1 and tiny damping lands on the least-squares
    solution; plain SGD on the same learning-rate grid (condition number ~1e4) cannot get there in
    100 steps for any stable learning rate."""
    torch.manual_seed(8)
    N, D, C = 64, 4, 2
    X = torch.randn(N, D) * torch.tensor([1.0, 3.0, 30.0, 100.0])
    y = X @ torch.randn(D, C) + 0.3 * torch.randn(N, C)
    loss_fn = lambda out, t: 0.5 * (out - t).pow(2).sum(-1).mean()  # noqa: E731

    Xa = torch.cat([X, torch.ones(N, 1)], 1)
    sol = torch.linalg.lstsq(Xa, y).solution
    opt_loss = loss_fn(Xa @ sol, y).item()
    init = nn.Linear(D, C)
    init_loss = loss_fn(init(X), y).item()
    tol = opt_loss + 1e-6 * (init_loss - opt_loss)
    grid = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]

    def steps_to_tol(make_opt, kfac: bool, max_steps: int = 100) -> float:
        model = copy.deepcopy(init)
        opt = make_opt(model)
        for t in range(max_steps):
            opt.zero_grad()
            if kfac:
                with opt.track():
                    out = model(X)
                opt.update_factors(out, y)
            else:
                out = model(X)
            loss_fn(out, y).backward()
            opt.step()
            with torch.no_grad():
                now = loss_fn(model(X), y).item()
            if not math.isfinite(now):
                return math.inf
            if now <= tol:
                return t + 1
        return math.inf

    kfac_steps = min(
        steps_to_tol(lambda m: KFACOptimizer(m, lr=lr, damping=1e-12, likelihood="regression", fisher_type="type-2",
                                             damping_rule="eigen", momentum=0.0), True, max_steps=3)
        for lr in grid
    )
    sgd_steps = min(steps_to_tol(lambda m: torch.optim.SGD(m.parameters(), lr=lr), False) for lr in grid)
    assert kfac_steps == 1
    assert sgd_steps == math.inf

    # and the single K-FAC step is the least-squares solution itself
    model = copy.deepcopy(init)
    opt = KFACOptimizer(model, lr=1.0, damping=1e-12, likelihood="regression", fisher_type="type-2",
                        damping_rule="eigen", momentum=0.0)
    one_step(model, opt, X, y, loss_fn)
    torch.testing.assert_close(torch.cat([model.weight.T, model.bias[None]]), sol, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------- models of the zoo
def test_vit_and_gnn_train():
    from marglik.data import collate_graphs, make_graph_dataset
    from marglik.models import GNN, PositionalEmbedding, ViT

    torch.manual_seed(9)
    vit = ViT(image_size=8, patch_size=4, dim=16, depth=1, heads=2, mlp_dim=16)
    opt = KFACOptimizer(vit, lr=0.05, damping=0.1, kl_clip=1e-2, fallback="adamw", fallback_lr=1e-3)
    fallback = opt.param_groups[1]["params"]
    assert len(fallback) == 1 and fallback[0] is vit.pos.weight
    assert isinstance(vit.pos, PositionalEmbedding)
    assert {layer.kind for layer in opt.layers} == {"kron", "diag"}  # LayerNorms preconditioned
    X, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    losses = [one_step(vit, opt, X, y)[1] for _ in range(8)]
    assert losses[-1] < losses[0]

    graphs = make_graph_dataset(24, seed=0)
    batch, yg = collate_graphs(graphs)
    gnn = GNN(1, 8, 2, num_layers=2)
    for approx in ("expand", "reduce"):
        opt = KFACOptimizer(gnn, lr=0.05, damping=0.1, approx=approx, kl_clip=1e-2)
        assert len(opt.param_groups) == 1  # everything preconditioned
        opt.zero_grad()
        with opt.track():
            out = gnn(*batch)
        opt.update_factors(out, yg)
        F.cross_entropy(out, yg).backward()
        opt.step()
        A = opt.state[opt.layers[0].key]["A"]
        assert torch.isfinite(A).all()


def test_multihead_attention_preconditioned_or_fallback():
    class MHANet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    model = MHANet()
    X, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    opt = KFACOptimizer(model, lr=0.1, damping=0.1)
    assert [layer.name for layer in opt.layers] == ["attn", "attn.out_proj", "head"]
    assert opt.layers[0].groups == 3 and len(opt.param_groups) == 1
    d, _ = one_step(model, opt, X, y)
    assert all(torch.isfinite(t).all() for t in d) and any(t.abs().sum() > 0 for t in d)
    opt = KFACOptimizer(model, lr=0.1, damping=0.1, ignore_modules=[nn.MultiheadAttention])
    assert [layer.name for layer in opt.layers] == ["head"]
    assert len(opt.param_groups[1]["params"]) == 4  # in_proj w/b and out_proj w/b: first-order
    d, _ = one_step(model, opt, X, y)
    assert all(torch.isfinite(t).all() for t in d)
    with pytest.raises(UnsupportedModuleError, match="add_bias_kv"):
        KFACOptimizer(nn.MultiheadAttention(8, 2, add_bias_kv=True), lr=0.1)


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=0.0), "lr must be a positive"),
        (dict(lr=-1.0), "lr must be a positive"),
        (dict(lr=float("nan")), "lr must be a positive"),
        (dict(damping=0.0), "damping must be a positive"),
        (dict(damping=-1e-3), "damping must be a positive"),
        (dict(factor_ema=1.0), "factor_ema"),
        (dict(momentum=1.0), "momentum"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(factor_update_every=0), "factor_update_every"),
        (dict(inverse_update_every=1.5), "inverse_update_every"),
        (dict(approx="bogus"), "K-FAC approximation"),
        (dict(fisher_type="bogus"), "fisher_type"),
        (dict(likelihood="bogus"), "likelihood"),
        (dict(damping_rule="bogus"), "damping_rule"),
        (dict(fallback="bogus"), "fallback"),
        (dict(kl_clip=0.0), "kl_clip"),
        (dict(fallback_lr=-1.0), "fallback_lr"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    model = nn.Linear(3, 2)
    args = dict(lr=0.1, damping=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        KFACOptimizer(model, **args)


def test_unsupported_layouts():
    class RawParam(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x * self.scale)

    with pytest.raises(UnsupportedModuleError, match="no K-FAC rule.*ignore_modules"):
        KFACOptimizer(RawParam(), lr=0.1, damping=0.1)
    opt = KFACOptimizer(RawParam(), lr=0.1, damping=0.1, ignore_modules=[""])  # the root's own parameter
    assert len(opt.param_groups[1]["params"]) == 1

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(UnsupportedModuleError, match="shared between modules"):
        KFACOptimizer(Tied(), lr=0.1, damping=0.1)
    with pytest.raises(TypeError, match="nn.Module"):
        KFACOptimizer(list(nn.Linear(2, 2).parameters()), lr=0.1, damping=0.1)

    class SparseEmb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 3, sparse=True)  # falls back automatically ...
            self.fc = nn.Linear(3, 2)

        def forward(self, idx):
            return self.fc(self.emb(idx))

    model = SparseEmb()
    opt = KFACOptimizer(model, lr=0.1, damping=0.1)
    with pytest.raises(RuntimeError, match="sparse gradients"):  # ... but sparse gradients are refused
        one_step(model, opt, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 1]))


def test_api_misuse_errors():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    opt = KFACOptimizer(model, lr=0.1, damping=0.1)
    F.cross_entropy(model(X), y).backward()
    with pytest.raises(RuntimeError, match="no curvature factors yet"):
        opt.step()
    opt.zero_grad()
    with opt.track():
        out = model(X)
    F.cross_entropy(out, y).backward()
    with pytest.raises(RuntimeError, match="update_factors"):
        opt.step()
    opt.zero_grad()
    with opt.track():
        out = model(X)
    F.cross_entropy(out, y).backward()
    with pytest.raises(RuntimeError, match="before loss.backward"):
        opt.update_factors(out, y)
    opt.param_groups[0]["damping"] = 0.0
    opt.zero_grad()
    with opt.track():
        out = model(X)
    opt.update_factors(out, y)
    F.cross_entropy(out, y).backward()
    with pytest.raises(ValueError, match="damping must be a positive"):
        opt.step()


class _RawShift(nn.Module):
    """A raw parameter no engine rule covers."""

    def __init__(self, first_order: bool) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(3, 4))
        self.marglik_first_order = first_order

    def forward(self, x):
        return x * (1.0 + self.shift.sum())


def test_first_order_marker_sends_module_to_fallback(float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), _RawShift(True), nn.Linear(4, 3))
    opt = KFACOptimizer(model, lr=0.1)
    assert [layer.name for layer in opt.layers] == ["0", "2"]
    assert opt.param_groups[1]["params"] == [model[1].shift]
    with pytest.raises(UnsupportedModuleError, match="'1'"):  # negative control: no marker, no rule
        KFACOptimizer(nn.Sequential(nn.Linear(4, 4), _RawShift(False), nn.Linear(4, 3)), lr=0.1)
    with pytest.raises(UnsupportedModuleError):  # the marker only concerns the optimizer's fallback
        KFAC(model)


def test_adamw_fallback_equals_torch_adamw(float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    opt = KFACOptimizer(model, lr=0.1, damping=1e-2, fallback="adamw", fallback_lr=0.01, weight_decay=0.1,
                        fallback_betas=(0.8, 0.99), fallback_eps=1e-6)
    twin = nn.Parameter(model[0].weight.detach().clone())
    ref = torch.optim.AdamW([twin], lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    for _ in range(3):
        X, y = torch.randint(0, 10, (8, 3)), torch.randint(0, 3, (8,))
        opt.zero_grad()
        with opt.track():
            out = model(X)
        opt.update_factors(out, y)
        F.cross_entropy(out, y).backward()
        twin.grad = model[0].weight.grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(model[0].weight, twin, rtol=1e-12, atol=1e-14)
