"""torchvision's VisionTransformer end to end: exact blocks for its raw parameters (class token,
positional embedding), KronLaplace's log marginal likelihood, and KFACOptimizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import block, exact_ggn
from test_optimizer import dense_reference, one_step
from torch import nn
from torchvision.models import VisionTransformer

from marglik import KFAC, KronLaplace
from marglik.curvature.kron import DiagonalBlock, KronBlock
from marglik.curvature.layers import UnsupportedModuleError
from marglik.optim import KFACOptimizer

TOL = dict(atol=1e-10, rtol=1e-10)


def tiny_vit(seed: int = 0, num_classes: int = 5) -> VisionTransformer:
    torch.manual_seed(seed)
    m = VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                          num_classes=num_classes)
    with torch.no_grad():  # torchvision zero-initialises these; random values make the test non-trivial
        m.class_token.normal_(0, 0.5)
        m.heads.head.weight.normal_(0, 0.5)
    return m


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_class_token_and_pos_embedding_blocks_are_exact(float64, approx):
    model = tiny_vit().double()
    X, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    kron = KFAC(model, approx=approx).fit((X, y))
    G = exact_ggn(model, "classification", X, y, params=kron.params)
    for name in ("class_token", "encoder.pos_embedding"):
        blk = {b.name: b for b in kron.blocks}[name]
        assert isinstance(blk, KronBlock) and blk.weight is None
        exact = block(G, kron, blk)
        torch.testing.assert_close(blk.to_dense(), exact, **TOL)
        assert exact.abs().sum() > 0
        off = exact - torch.diag(exact.diagonal())
        assert off.abs().max() > 1e-3 * exact.abs().max()  # negative control: a diagonal would not do
    # negative control: a Kronecker block of the same model is not exact
    mlp = {b.name: b for b in kron.blocks}["encoder.layers.encoder_layer_0.mlp.0"]
    assert not torch.allclose(mlp.to_dense(), block(G, kron, mlp), atol=1e-6)


def test_batched_backward_equals_loop(float64):
    """The vmapped backward (CUDA's default) through attention and the leaves gives the same factors."""
    model = tiny_vit().double()
    X, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    for approx in ("expand", "reduce"):
        a = KFAC(model, approx=approx, batched_backward=True).fit((X, y)).to_dense()
        b = KFAC(model, approx=approx, batched_backward=False).fit((X, y)).to_dense()
        torch.testing.assert_close(a, b, **TOL)


def test_large_leaf_gets_exact_diagonal(float64, monkeypatch):
    import marglik.curvature.layers.leaf as leaf

    monkeypatch.setattr(leaf, "LEAF_DENSE_MAX", 10)  # pos_embedding (1, 5, 8) = 40 entries > 10
    model = tiny_vit().double()
    X, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    kron = KFAC(model).fit((X, y))
    blk = {b.name: b for b in kron.blocks}["encoder.pos_embedding"]
    assert isinstance(blk, DiagonalBlock) and blk.blocks.shape == (40, 1, 1)
    G = exact_ggn(model, "classification", X, y, params=kron.params)
    torch.testing.assert_close(blk.to_dense(), torch.diag(block(G, kron, blk).diagonal()), **TOL)


def test_augmented_copies_reduce_is_exact_for_leaves(float64):
    """Example-major copies averaged before the loss: the copy axis is reduced, the leaf block exact."""

    class Invariant(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = tiny_vit().double()

        def forward(self, x):
            n, s = x.shape[:2]
            return self.vit(x.reshape(n * s, *x.shape[2:])).reshape(n, s, -1).mean(1)

    model = Invariant()
    X, y = torch.randn(3, 2, 3, 8, 8), torch.randint(0, 5, (3,))
    kron = KFAC(model, approx="reduce").fit((X, y))
    G = exact_ggn(model, "classification", X, y, params=kron.params)
    for name in ("vit.class_token", "vit.encoder.pos_embedding"):
        blk = {b.name: b for b in kron.blocks}[name]
        torch.testing.assert_close(blk.to_dense(), block(G, kron, blk), **TOL)
    expand = KFAC(model, approx="expand").fit((X, y))
    eb = {b.name: b for b in expand.blocks}["vit.class_token"]
    assert not torch.allclose(eb.to_dense(), block(G, kron, eb), atol=1e-8)


def test_unbroadcastable_leaf_is_an_error():
    class Bad(nn.Module):
        marglik_broadcast_parameters = ("pos",)

        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(5, 4))

    with pytest.raises(UnsupportedModuleError, match="leading singleton"):
        KFAC(nn.Sequential(Bad(), nn.Linear(4, 2)))

    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x) * self.scale

    with pytest.raises(UnsupportedModuleError, match="no K-FAC rule"):
        KFAC(Raw())


def test_parameters_restored_after_recording():
    model = tiny_vit()
    token = model.class_token
    kfac = KFAC(model)
    kfac.fit((torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,))))
    assert model.class_token is token and isinstance(model.encoder.pos_embedding, nn.Parameter)
    with pytest.raises(AssertionError, match="image height"):
        with kfac.capture():
            model(torch.randn(2, 3, 7, 7))  # wrong image size: the forward raises after the pre-hook
    assert model.class_token is token and isinstance(model.encoder.pos_embedding, nn.Parameter)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kron_laplace_marglik_finite_and_differentiable(approx):
    model = tiny_vit()
    X, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    la = KronLaplace(model, approx=approx).fit([(X[:8], y[:8]), (X[8:], y[8:])])
    prior = torch.ones(la.n_layers, requires_grad=True)
    lml = la.log_marginal_likelihood(prior)
    assert torch.isfinite(lml)
    (g,) = torch.autograd.grad(lml, prior)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    probs = la(X[:3])
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_optimizer_update_equals_dense_damped_inverse(float64):
    model = tiny_vit()
    X, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    lam = 0.05
    opt = KFACOptimizer(model, lr=1.0, damping=lam, momentum=0.0, fisher_type="type-2", damping_rule="eigen")
    assert len(opt.param_groups) == 1  # every parameter is preconditioned
    delta, _ = one_step(model, opt, X, y)
    params = list(model.parameters())
    names = [layer.name for layer in opt.layers]
    assert "class_token" in names and "encoder.layers.encoder_layer_0.self_attention" in names
    for layer in opt.layers:
        g = torch.cat([p.grad.reshape(-1) for p in layer.params])
        d = torch.cat([delta[next(i for i, q in enumerate(params) if q is p)].reshape(-1) for p in layer.params])
        ref = torch.linalg.solve(dense_reference(opt, layer, lam, "eigen"), g)
        torch.testing.assert_close(d, ref, rtol=1e-8, atol=1e-10)


def test_optimizer_trains_torchvision_vit():
    torch.manual_seed(0)
    model = tiny_vit(num_classes=3)
    X = torch.randn(48, 3, 8, 8)
    y = (X[:, 0, :4].mean((1, 2)) > 0).long() + (X[:, 1, 4:].mean((1, 2)) > 0).long()
    opt = KFACOptimizer(model, lr=0.1, damping=1e-2, kl_clip=1e-2, momentum=0.0)
    with torch.no_grad():
        first = F.cross_entropy(model(X), y).item()
    for _ in range(30):
        one_step(model, opt, X, y)
    with torch.no_grad():
        last = F.cross_entropy(model(X), y).item()
    assert last < 0.7 * first, (first, last)


def test_cli_config_vit_runs_marglik_with_augmentation(tmp_path):
    """``model=vit`` (torchvision's ViT) through the tuning loop: learned augmentation + marglik."""
    from hydra_config import compose_config

    from marglik.cli import run_from_config

    cfg = compose_config([
        "model=vit", "model.hidden_dim=8", "model.num_heads=2", "model.num_layers=1", "model.mlp_dim=16",
        "model.patch_size=4", "data.train_size=32", "trainer.epochs=2", "trainer.batch_size=16",
        "hyper.burn_in=1", "hyper.n_samples=2", "hyper.marglik_batches=1", "trainer.progress=false",
        "logger.mode=disabled", "trainer.num_threads=1",
    ])
    s = run_from_config(cfg, str(tmp_path))  # the thread count is restored by conftest's fixture
    assert s["model"] == "vit" and torch.isfinite(torch.tensor(s["log_marglik"]))
    assert set(s["augmentation"]) >= {"rotation", "translation_x"}
