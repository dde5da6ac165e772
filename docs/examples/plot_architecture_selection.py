"""
Selecting an architecture by marginal likelihood
================================================

The log marginal likelihood of each trained model ranks discrete choices too. Four networks are
tuned on 500 digits (prior precisions learned, no augmentation) and ranked by the reported log
marginal likelihood (the selection value on the whole training set); the test accuracy beside it
is for reading only. On the command line the same is a sweep and ``marglik-report``::

    marglik -m model=mlp,cnn trainer.epochs=20 hydra.sweep.dir=runs/arch
    marglik-report runs/arch
"""

import tempfile

import matplotlib.pyplot as plt

from marglik.tuning import Config, tune

candidates = {
    "MLP 32": {"name": "mlp", "hidden": [32]},
    "MLP 256-256": {"name": "mlp", "hidden": [256, 256]},
    "CNN 4": {"name": "cnn", "width": 4, "hidden": 16},
    "CNN 16": {"name": "cnn", "width": 16, "hidden": 64},
}
results = {}
with tempfile.TemporaryDirectory() as tmp:
    for i, (label, model) in enumerate(candidates.items()):
        cfg = Config.from_dict(
            data={"name": "digits", "train_size": 500},
            model=model,
            hyper={
                "augmentation": False,
                "burn_in": 3,
                "marglik_batches": None,
                "steps": 5,
            },
            trainer={
                "epochs": 15,
                "batch_size": 32,
                "progress": False,
                "eval_every": 0,
            },
            logger={"mode": "disabled"},
        )
        results[label] = tune(cfg, f"{tmp}/{i}")

ranked = sorted(results.items(), key=lambda kv: kv[1]["log_marglik"], reverse=True)
for rank, (label, s) in enumerate(ranked, 1):
    print(
        f"{rank}. {label:12s} log marglik {s['log_marglik']:8.1f}   "
        f"test accuracy {s['test_accuracy']:.3f}"
        f"   test NLL {s['test_nll']:.3f}"
    )

# %%
# Per example, the evidence against what the test set says. The evidence measures how well the
# model class explains the training data under its learned prior; the test NLL is one held-out
# check of it. Where the two disagree (two models with the same test accuracy, say), the evidence is
# the one that was available without the test set.
fig, ax = plt.subplots(figsize=(6, 4))
for label, s in results.items():
    ax.scatter(s["log_marglik"] / s["train_size"], s["test_nll"], s=40)
    ax.annotate(
        label,
        (s["log_marglik"] / s["train_size"], s["test_nll"]),
        textcoords="offset points",
        xytext=(6, 4),
        fontsize=9,
    )
ax.set(
    xlabel="log marginal likelihood / N (training data only)",
    ylabel="test NLL",
    title="higher evidence, lower test NLL?",
)
fig.tight_layout()
