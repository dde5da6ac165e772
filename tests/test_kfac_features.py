"""Weight tying, example grouping, batching, Fisher types and differentiability of KFAC."""

from __future__ import annotations

import warnings

import pytest
import torch
from reference import block_diagonal_mask, conv_reduce, exact_ggn
from torch import nn

import marglik

RTOL = 1e-10


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


class _Tied(nn.Module):
    """One Linear called on two halves of the positions (weight tying across calls)."""

    def __init__(self, reduce: bool):
        super().__init__()
        self.shared, self.out, self.reduce = nn.Linear(3, 4), nn.Linear(4, 2), reduce

    def forward(self, x):
        R = x.shape[1] // 2
        h = torch.cat([self.shared(x[:, :R]), self.shared(x[:, R:])], dim=1)
        h = self.out(h)
        return h.mean(1) if self.reduce else h


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_weight_tying_is_weight_sharing_across_calls(approx, float64):
    torch.manual_seed(0)
    model = _Tied(reduce=approx == "reduce")
    X = torch.randn(4, 6, 3)
    y = torch.randn_like(model(X))
    G = exact_ggn(model, "regression", X, y)
    kron = marglik.KFAC(model, "regression", approx=approx).fit((X, y))
    assert rel_err(kron.to_dense(), G * block_diagonal_mask(kron)) < RTOL


class _Nodes(nn.Module):
    """Node-wise Linear layers on stacked nodes ``(T, D)`` with a graph index, mean readout."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x, batch):
        N = int(batch.max()) + 1
        with marglik.example_index(batch):
            h = self.l2(self.l1(x))
            s = torch.zeros(N, h.shape[1], dtype=h.dtype).index_add(0, batch, h)
            n = torch.bincount(batch, minlength=N).to(h.dtype)
            return self.head(s / n[:, None])


def test_example_index_reduce_exact_for_variable_graph_sizes(float64):
    torch.manual_seed(1)
    model = _Nodes()
    sizes = [2, 5, 3]
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    x = torch.randn(len(batch), 3)
    y = torch.randn(3, 2)

    class Wrapped(nn.Module):  # reference needs a single-tensor-input model
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x, batch)

    G = exact_ggn(Wrapped(model), "regression", x, y)
    kron = marglik.KFAC(model, "regression", approx="reduce").fit(((x, batch), y))
    assert rel_err(kron.to_dense(), G * block_diagonal_mask(kron)) < RTOL


def test_example_major_copies_are_a_shared_axis(float64):
    """Inputs ``(N, S, C, H, W)`` flattened to ``(N*S, ...)`` (augmented copies): reduce exact."""
    torch.manual_seed(2)
    inner = conv_reduce(2, kernel_size=2)

    class Invariant(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            N, S = x.shape[:2]
            return self.inner(x.reshape(N * S, *x.shape[2:])).view(N, S, -1).mean(1)

    model = Invariant()
    X = torch.randn(3, 4, 2, 5, 5)
    y = torch.randn(3, 2)
    G = exact_ggn(model, "regression", X, y)
    kron = marglik.KFAC(model, "regression", approx="reduce").fit((X, y))
    assert rel_err(kron.to_dense(), G * block_diagonal_mask(kron)) < RTOL


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_batches_sum_to_full_batch(approx, fisher_type, float64):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4))
    X, y = torch.randn(10, 1, 6, 6), torch.randint(0, 4, (10,))
    kfac = marglik.KFAC(model, "classification", approx=approx, fisher_type=fisher_type)
    full = kfac.fit((X, y))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=3)
    batched = kfac.fit(loader)
    assert batched.num_data == full.num_data == 10
    assert torch.allclose(batched.meta["loss"], full.meta["loss"])
    for a, b in zip(full.blocks, batched.blocks):
        assert rel_err(b.A, a.A) < RTOL and rel_err(b.B, a.B) < RTOL
    half = kfac.fit((X[:5], y[:5]), num_data=10)  # a subset, rescaled to the data-set size
    ref = kfac.fit((X[:5], y[:5]))
    for a, b in zip(ref.blocks, half.blocks):
        assert torch.allclose(b.B, 2 * a.B) and torch.allclose(b.A, a.A)
    assert half.num_data == 10


def test_list_of_batches_and_tensor_tuple_input(float64):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 2))
    X, y = torch.randn(6, 3), torch.randn(6, 2)
    kfac = marglik.KFAC(model, "regression")
    a = kfac.fit([(X[:2], y[:2]), (X[2:], y[2:])]).to_dense()
    b = kfac.fit((X, y)).to_dense()
    assert rel_err(a, b) < RTOL


@pytest.mark.parametrize("fisher_type", ["mc", "mc-root"])
@pytest.mark.parametrize("likelihood", ["classification", "regression", "binary"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_mc_converges_to_type2(likelihood, approx, fisher_type, float64):
    """Sampled-label Fisher (mc) and the root times random signs (mc-root) -> GGN, and two samples
    are noticeably noisy. (With per-position losses, type-2 stacks the positions' square roots into C
    columns; the Monte-Carlo estimates match it where positions do not mix, see likelihoods.py.)"""
    torch.manual_seed(5)
    C = 1 if likelihood == "binary" else 3
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C))

    class PerPosition(nn.Module):
        """Two shared positions per example; reduce's setting averages them before the loss."""

        def __init__(self):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            out = self.mlp(x)
            return out.mean(1) if approx == "reduce" else out

    model = PerPosition()
    X = torch.randn(8, 2, 4)
    out = model(X)
    y = {"classification": torch.randint(0, C, out.shape[:-1]), "regression": torch.randn(out.shape),
         "binary": torch.randint(0, 2, out.shape).double()}[likelihood]
    exact = marglik.KFAC(model, likelihood, approx=approx).fit((X, y)).to_dense()
    gen = torch.Generator().manual_seed(0)
    mc = marglik.KFAC(model, likelihood, approx=approx, fisher_type=fisher_type, mc_samples=4000, generator=gen)
    assert rel_err(mc.fit((X, y)).to_dense(), exact) < 0.1
    few = marglik.KFAC(model, likelihood, approx=approx, fisher_type=fisher_type, mc_samples=2, generator=gen)
    if fisher_type == "mc-root" and likelihood == "binary":  # one output: (root x sign)^2 is its Hessian, exactly
        assert rel_err(few.fit((X, y)).to_dense(), exact) < 1e-12
    else:
        assert rel_err(few.fit((X, y)).to_dense(), exact) > 0.02  # few samples are noticeably noisy


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_differentiable_factors_gradcheck(approx, fisher_type, float64):
    """Factors are differentiable w.r.t. a parameter of an input transformation."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 25, 3))
    X, y = torch.randn(4, 1, 5, 5), torch.randint(0, 3, (4,))
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    kfac = marglik.KFAC(model, "classification", approx=approx, fisher_type=fisher_type, differentiable=True)

    def f(th):
        kron = kfac.fit((X * torch.exp(th[0]) + th[1], y))
        return sum(torch.logdet(b.A[0] + torch.eye(b.A.shape[-1])) + b.B.pow(2).sum() for b in kron.blocks)

    assert torch.autograd.gradcheck(f, (theta,))
    plain = marglik.KFAC(model, "classification", approx=approx, fisher_type=fisher_type)
    kron = plain.fit((X * torch.exp(theta[0]), y))
    assert all(b.A.grad_fn is None and b.B.grad_fn is None for b in kron.blocks)


def test_to_dense_follows_model_parameter_order(float64):
    """Blocks are placed by parameter offsets even when module registration order differs."""

    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.second = nn.Linear(4, 2)
            self.first = nn.Linear(3, 4)

        def forward(self, x):
            return self.second(torch.tanh(self.first(x)))

    torch.manual_seed(7)
    model = Reordered()
    X, y = torch.randn(1, 3), torch.tensor([0])
    kron = marglik.KFAC(model, "classification").fit((X, y))
    assert [b.name for b in kron.blocks] == ["second", "first"]
    G = exact_ggn(model, "classification", X, y)
    assert rel_err(kron.to_dense(), G * block_diagonal_mask(kron)) < RTOL


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("differentiable", [False, True])
def test_batched_backward_equals_column_loop(approx, differentiable, float64):
    """The vmapped backward (default on CUDA) and the hooked column loop (CPU) agree."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3), nn.Flatten(),
                          nn.Linear(2 * 9, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    X, y = torch.randn(5, 1, 5, 5), torch.randint(0, 3, (5,))
    kw = dict(approx=approx, differentiable=differentiable)
    loop = marglik.KFAC(model, "classification", batched_backward=False, **kw).fit((X, y)).to_dense()
    vmap = marglik.KFAC(model, "classification", batched_backward=True, max_grad_memory=2000, **kw).fit((X, y))
    assert rel_err(vmap.to_dense(), loop) < RTOL


class _ViewsConvOutput(nn.Module):
    """Conv -> BatchNorm (train mode) -> ``.view`` of a spatial map: fails on channels-last input."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Linear(3 * 16, 2)

    def forward(self, x):
        h = self.bn(self.conv(x)).relu()
        return self.head(h.view(h.shape[0], -1))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_channels_last_forward_gives_the_same_factors(approx, float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    X, y = torch.randn(5, 2, 6, 6), torch.randint(0, 2, (5,))
    dense = {
        cl: marglik.KFAC(model, approx=approx, channels_last=cl).fit((X, y)).to_dense() for cl in (True, False)
    }
    assert rel_err(dense[True], dense[False]) < 1e-12
    assert X.is_contiguous()  # the caller's tensor is not modified


def test_channels_last_auto_falls_back_without_side_effects(float64):
    torch.manual_seed(0)
    model = _ViewsConvOutput()
    X, y = torch.randn(4, 2, 4, 4), torch.randint(0, 2, (4,))
    reference_model = _ViewsConvOutput()
    reference_model.load_state_dict(model.state_dict())
    ref = marglik.KFAC(reference_model, channels_last=False).fit((X, y)).to_dense()
    kfac = marglik.KFAC(model)  # "auto": tries channels-last on the first batch
    with pytest.warns(UserWarning, match="channels-last"):
        dense = kfac.fit((X, y)).to_dense()
    assert torch.equal(dense, ref)
    # BatchNorm statistics were updated once, as without the attempt
    assert torch.equal(model.bn.running_mean, reference_model.bn.running_mean)
    assert model.bn.num_batches_tracked.item() == reference_model.bn.num_batches_tracked.item() == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kfac.fit((X, y))  # remembered: no second attempt
    with pytest.raises(RuntimeError, match="view"):
        marglik.KFAC(model, channels_last=True).fit((X, y))
    with pytest.raises(ValueError, match="channels_last"):
        marglik.KFAC(model, channels_last="yes")

