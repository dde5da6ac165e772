"""
A Laplace posterior and its predictive on a toy problem
=======================================================

A small MLP is fitted to noisy samples of a sine with a gap in the middle. :class:`marglik.KronLaplace`
puts a Kronecker-factored Gaussian around the trained weights, the prior precision and the noise
level are tuned by gradient ascent on the log marginal likelihood, and the linearised (GLM)
predictive gives error bars that widen where there are no data.
"""

import matplotlib.pyplot as plt
import torch
from torch import nn

import marglik

torch.manual_seed(0)
X = torch.cat(
    [torch.empty(60, 1).uniform_(-4, -1), torch.empty(60, 1).uniform_(1, 4)]
)
y = torch.sin(X) + 0.2 * torch.randn_like(X)
model = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))

# %%
# MAP training: the summed squared error plus a weak weight decay (the prior's negative log density).
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(2000):
    opt.zero_grad()
    loss = 0.5 * ((model(X) - y) ** 2).sum() + 5e-4 * sum(
        (p**2).sum() for p in model.parameters()
    )
    loss.backward()
    opt.step()

# %%
# The Laplace approximation. ``fit`` takes the data as one ``(X, y)`` tuple, a DataLoader or any
# iterable of batches. Its log marginal likelihood is differentiable w.r.t. the prior precision
# (one per parameter tensor here) and the observation noise, so both are tuned with Adam.
la = marglik.KronLaplace(model, "regression", approx="expand")
la.fit((X, y))
log_prior = torch.zeros(len(la.params), requires_grad=True)
log_sigma = torch.zeros((), requires_grad=True)
hyper = torch.optim.Adam([log_prior, log_sigma], lr=0.1)
for _ in range(200):
    hyper.zero_grad()
    neg = -la.log_marginal_likelihood(
        prior_precision=log_prior.exp(), sigma_noise=log_sigma.exp()
    )
    neg.backward()
    hyper.step()
print(
    f"log marginal likelihood {-neg.item():.1f} nats, "
    f"noise std {log_sigma.exp().item():.3f} (true 0.2)"
)
print("prior precision per tensor:", [f"{p:.3g}" for p in log_prior.exp().tolist()])

# %%
# The GLM predictive: the network linearised at the MAP, ``f_var = J P^{-1} J^T``; the predictive
# standard deviation adds the learned noise.
X_test = torch.linspace(-6, 6, 300).unsqueeze(-1)
f_mu, f_var = la(X_test)
sigma = log_sigma.exp().detach()
std = (f_var.squeeze() + sigma**2).sqrt()
mu = f_mu.squeeze()

fig, ax = plt.subplots(figsize=(7, 3.5))
ax.scatter(X.squeeze(), y.squeeze(), s=8, color="k", label="data")
ax.plot(X_test.squeeze(), torch.sin(X_test).squeeze(), "k:", lw=1, label="sin(x)")
ax.plot(X_test.squeeze(), mu, color="C0", label="MAP")
ax.fill_between(
    X_test.squeeze(),
    mu - 2 * std,
    mu + 2 * std,
    color="C0",
    alpha=0.25,
    label="predictive ±2 sd",
)
ax.set(
    xlabel="x",
    ylabel="y",
    ylim=(-3, 3),
    title="K-FAC Laplace predictive, hyperparameters by marginal likelihood",
)
ax.legend(loc="lower left", fontsize=8)
fig.tight_layout()
