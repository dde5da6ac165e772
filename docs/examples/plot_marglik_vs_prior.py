"""
Log marginal likelihood against the prior precision
===================================================

The prior precision ``delta`` of a Gaussian prior ``N(0, 1/delta)`` is weight decay. The marginal
likelihood trades the fit of the data against the Occam factor (the log-determinant ratio of the
posterior and prior precisions) and the scatter of the weights under the prior; its maximum picks
``delta`` without a validation set. Here an MLP on 8x8 digits is trained once per ``delta`` of a
grid, and each model's log marginal likelihood is set beside its test NLL, which the marginal
likelihood never sees.
"""

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import marglik

digits = load_digits()
X = torch.tensor(digits.data, dtype=torch.float32) / 16
y = torch.tensor(digits.target)
X_train, y_train, X_test, y_test = X[:500], y[:500], X[1000:], y[1000:]


def train(delta: float) -> nn.Module:
    """MAP: summed cross-entropy + ``delta / 2 ||theta||^2`` (full batch, Adam)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = F.cross_entropy(model(X_train), y_train, reduction="sum")
        loss = loss + 0.5 * delta * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        opt.step()
    return model


# %%
# One model per prior precision; the Laplace approximation at each MAP, with the same scalar prior.
deltas = torch.logspace(-2, 3, 11)
rows = []
for delta in deltas.tolist():
    model = train(delta)
    la = marglik.KronLaplace(
        model, "classification", approx="expand", prior_precision=delta
    )
    la.fit((X_train, y_train))
    log_ml = la.log_marginal_likelihood().item()
    with torch.no_grad():
        test_nll = F.cross_entropy(model(X_test), y_test).item()
    rows.append((delta, log_ml / len(X_train), test_nll))
    print(
        f"delta {delta:8.3g}: log marglik / N {log_ml / len(X_train):7.3f}, "
        f"test NLL {test_nll:.3f}"
    )

best = max(rows, key=lambda r: r[1])
print(
    f"the marginal likelihood selects delta = {best[0]:.3g}; "
    f"the lowest test NLL is at delta = {min(rows, key=lambda r: r[2])[0]:.3g}"
)

# %%
# At one MAP, the three terms as functions of ``delta``: the log-likelihood does not change (the
# weights are fixed), the Occam factor rewards a strong prior, the scatter a weak one.
la = marglik.KronLaplace(train(best[0]), "classification", approx="expand")
la.fit((X_train, y_train))
grid = torch.logspace(-3, 4, 50)
terms = {
    "log-likelihood": [],
    "-1/2 log det ratio": [],
    "-1/2 scatter": [],
    "log marglik": [],
}
for d in grid.tolist():
    la.prior_precision = d
    terms["log-likelihood"].append(la.log_likelihood.item())
    terms["-1/2 log det ratio"].append(-0.5 * la.log_det_ratio.item())
    terms["-1/2 scatter"].append(-0.5 * la.scatter.item())
    terms["log marglik"].append(la.log_marginal_likelihood().item())

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
d, ml, nll = zip(*rows)
ax1.semilogx(d, ml, "o-", color="C0")
ax1.set(
    xlabel="prior precision (weight decay) of the trained model",
    ylabel="log marglik / N",
    title="selection",
)
ax1b = ax1.twinx()
ax1b.semilogx(d, nll, "s--", color="C3")
ax1b.set_ylabel("test NLL (never seen)", color="C3")
ax1.axvline(best[0], color="C0", lw=0.8, ls=":")
for name, values in terms.items():
    ax2.semilogx(
        grid,
        [v / len(X_train) for v in values],
        lw=2.5 if name == "log marglik" else 1.2,
        label=name,
    )
ax2.set(
    xlabel="prior precision at a fixed MAP",
    ylabel="nats per example",
    title="the terms",
    ylim=(-3, 0.5),
)
ax2.legend(fontsize=8)
fig.tight_layout()
