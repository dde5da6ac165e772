"""
K-FAC-expand vs K-FAC-reduce: accuracy and cost
===============================================

A convolution shares its weights over the positions of an image. K-FAC-expand treats every position
as an example of its own (input factor ``A`` summed over examples x positions); K-FAC-reduce first
sums the inputs and output gradients over the positions of each example (``A`` from one row per
example). Neither is exact for a CNN with pooling, but both approximate the GGN the Laplace
posterior needs. Here both are compared with the exact GGN on a small CNN, and then timed on a wider
one, where reduce's factors are built from fewer rows than their dimension and are kept as rows
(rank-bounded factors).
"""

import time

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch.func import functional_call, jacrev

import marglik
from marglik import RowFactor
from marglik.models import SmallCNN

digits = load_digits()
X = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
y = torch.tensor(digits.target)

# %%
# The exact GGN of a small CNN (1,034 parameters) on 128 digits, ``sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n``,
# from ``torch.func`` Jacobians in float64; the log-determinant ratio ``log det(GGN + delta I) - P log delta``
# is the Occam factor of the log marginal likelihood, the only term where the curvature enters.
torch.manual_seed(0)
model = SmallCNN(in_channels=1, num_classes=10, width=4, hidden=16).double()
Xs, ys = X[:128].double(), y[:128]
params = {k: v.detach() for k, v in model.named_parameters()}
J = jacrev(lambda p: functional_call(model, p, (Xs,)))(params)
J = torch.cat([j.flatten(start_dim=2) for j in J.values()], dim=-1)  # (N, C, P)
prob = torch.softmax(model(Xs), -1).detach()
H = torch.diag_embed(prob) - prob.unsqueeze(-1) * prob.unsqueeze(-2)  # (N, C, C)
ggn = torch.einsum("ncp,ncd,ndq->pq", J, H, J)
P = ggn.shape[0]
print(f"{P} parameters")

deltas = torch.logspace(-3, 3, 25, dtype=torch.float64)
exact = [
    (
        torch.linalg.slogdet(ggn + d * torch.eye(P, dtype=torch.float64))[1]
        - P * torch.log(d)
    ).item()
    for d in deltas
]
ratios = {}
for approx in ("expand", "reduce"):
    la = marglik.KronLaplace(model, "classification", approx=approx)
    la.fit((Xs, ys))
    ratios[approx] = []
    for d in deltas:
        la.prior_precision = d
        ratios[approx].append(la.log_det_ratio.item())
for approx, values in ratios.items():
    at = {
        f"{deltas[i].item():g}": f"{values[i]:.0f} vs {exact[i]:.0f}"
        for i in (0, 12, 24)
    }
    print(
        f"K-FAC-{approx} log det ratio vs the exact GGN's, at prior precision {at}"
    )

# %%
# Cost on a wider CNN (32 and 64 channels) on the digits upsampled to 16x16. ``KFAC.fit`` builds the
# factors; the rows-vs-dense choice (``factor_form="auto"``) is reported per block.
wide = SmallCNN(in_channels=1, num_classes=10, width=32, hidden=128)
X16 = torch.nn.functional.interpolate(X, size=16, mode="bilinear")


def seconds(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


sizes = [16, 64, 256]
cost = {"expand": [], "reduce": []}
for n in sizes:
    batch = (X16[:n], y[:n])
    for approx in cost:
        la = marglik.KronLaplace(
            wide, "classification", approx=approx, prior_precision=1.0
        )
        prior = torch.ones(len(la.params), requires_grad=True)

        def step():
            la.fit(batch)  # factors and their eigendecompositions
            la.log_marginal_likelihood(prior_precision=prior).backward()

        cost[approx].append(seconds(step))
    kron = marglik.KFAC(wide, likelihood="classification", approx="reduce").fit(
        batch
    )
    forms = ", ".join(
        f"{b.name}: {'rows' if isinstance(b.A_factor, RowFactor) else 'dense'}"
        for b in kron.blocks
    )
    print(
        f"n = {n:3d}: expand {cost['expand'][-1]:.3f} s, "
        f"reduce {cost['reduce'][-1]:.3f} s; "
        f"reduce's input factors: {forms}"
    )

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
ax1.semilogx(deltas, exact, "k-", lw=2.5, label="exact GGN")
for approx, values in ratios.items():
    ax1.semilogx(deltas, values, "--", label=f"K-FAC-{approx}")
ax1.set(
    xlabel="prior precision",
    ylabel="log det ratio (nats)",
    title=f"small CNN, {P} parameters, 128 digits",
)
ax1.legend(fontsize=8)
width = 0.38
xs = torch.arange(len(sizes))
ax2.bar(xs - width / 2, cost["expand"], width, label="expand")
ax2.bar(xs + width / 2, cost["reduce"], width, label="reduce")
ax2.set_xticks(xs.tolist(), [str(n) for n in sizes])
ax2.set(
    xlabel="images in the fit",
    ylabel="seconds (fit + log marglik + gradient)",
    title="wider CNN on 16x16 inputs",
)
ax2.legend(fontsize=8)
fig.tight_layout()
