#!/usr/bin/env python
"""The tuning loop with each curvature backend: marglik expand / reduce against laplace-torch's
curvlinops, ASDL and BackPACK backends, Kronecker and diagonal.

Digits, no augmentation, layerwise prior, the same data, batches, marglik subsets and schedule for
every run (``trainer.seed`` fixes them), so only ``curvature.backend`` / ``structure`` / ``approx``
differ. Two models: the MLP, which every peer runs (BackPACK through ``MLP.as_sequential()``), and
the small CNN, where BackPACK's KFLR stops at ``AdaptiveAvgPool2d`` -- that run is reported with the
error the tuner raises at start-up.

Reported per run: seconds per marglik step (median over the run's Laplace fits; a fit + log marglik +
gradient step; also as a ratio to marglik reduce on the same model, measured in this one process), the final log marginal
likelihood (each backend's own estimate at the last update, ``trainer.final_model=last``), test
accuracy and NLL, and the learned prior precisions (one per parameter tensor).

Writes ``results/tuning_backends.{md,json,png}`` (the markdown and figure rendered from the JSON
alone: ``--from-json`` re-renders them); run directories go under ``--run-root``. All runs
are sequential in this process with ``--threads`` torch threads (default 1; the machine is
shared). The default takes about 5-8 minutes on 2 CPU cores; ``--quick`` is a smoke test.

    python scripts/run_tuning_backends.py
    python scripts/run_tuning_backends.py --quick --out /tmp/tb
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from benchlib import ROOT as REPO
from runner import rerender, write_outputs

STEM = "tuning_backends"
os.environ.setdefault("WANDB_MODE", "disabled")

CURVATURES = [  # (backend, structure, approx)
    ("marglik", "kron", "expand"),
    ("marglik", "kron", "reduce"),
    ("curvlinops", "kron", "expand"),
    ("curvlinops", "kron", "reduce"),
    ("curvlinops", "diag", "expand"),
    ("asdl", "kron", "expand"),
    ("asdl", "diag", "expand"),
    ("backpack", "kron", "expand"),
    ("backpack", "diag", "expand"),
]
MODELS = {
    "mlp": {"name": "mlp", "hidden": [64, 64], "activation": "tanh"},
    "cnn": {"name": "cnn", "width": 8, "hidden": 32},
}


def config(model: str, backend: str, structure: str, approx: str, args) -> Dict[str, Any]:
    return dict(
        data={"name": "digits", "seed": 0},
        model=MODELS[model],
        curvature={"backend": backend, "structure": structure, "approx": approx, "fisher_type": "type-2"},
        hyper={"prior_structure": "layerwise", "augmentation": False, "lr": 0.1, "steps": args.steps,
               "frequency": args.frequency, "burn_in": args.burn_in, "marglik_batches": args.marglik_batches,
               "marglik_batch_size": 128},
        trainer={"epochs": args.epochs, "batch_size": 64, "lr": 3e-3, "seed": 0, "progress": False,
                 "num_threads": args.threads, "final_model": "last", "eval_every": 0, "resume": "never"},
        logger={"mode": "disabled", "group": "digits-backends"},
    )


def run_all(args) -> List[Dict[str, Any]]:
    from marglik.tuning import Config, MarglikTuner
    from marglik.tuning.backends import curvature_label

    rows = []
    for model in args.models:
        for backend, structure, approx in CURVATURES:
            cfg = Config.from_dict(**config(model, backend, structure, approx, args))
            label = curvature_label(cfg.to_dict()["curvature"])
            run_dir = Path(args.run_root) / f"{model}-{label}"
            t0 = time.perf_counter()
            row: Dict[str, Any] = {"model": model, "curvature": label, "backend": backend, "structure": structure,
                                   "approx": approx if structure == "kron" else None}
            try:
                tuner = MarglikTuner(cfg, run_dir)
                s = tuner.fit()
            except ValueError as e:  # a peer that cannot run the model: the tuner's start-up error
                row["error"] = str(e)
                print(f"{model:4s} {label:24s} not run: {e}", flush=True)
                rows.append(row)
                continue
            row.update({
                "seconds_per_marglik_step": statistics.median(tuner.timing["marglik_step_seconds"]),
                "seconds_per_marglik_step_mean": s["seconds_per_marglik_step"],
                "seconds_per_cached_hyperstep": s["seconds_per_cached_hyperstep"],
                "log_marglik": s["log_marglik"],
                "log_marglik_per_example": s["log_marglik_per_example"],
                "test_accuracy": s["test_accuracy"],
                "test_nll": s["test_nll"],
                "prior_precision": s["prior_precision"],
                "n_laplace_fits": s["n_laplace_fits"],
                "num_params": s["num_params"],
                "run_seconds": time.perf_counter() - t0,
            })
            print(f"{model:4s} {label:24s} {row['seconds_per_marglik_step']:.3f} s/step  lml/N "
                  f"{row['log_marglik_per_example']:.4f}  acc {row['test_accuracy']:.4f}  nll {row['test_nll']:.4f}",
                  flush=True)
            rows.append(row)
    for model in args.models:
        base = next((r for r in rows if r["model"] == model and r["curvature"] == "marglik-reduce"
                     and "error" not in r), None)
        for r in rows:
            if r["model"] == model and "error" not in r and base:
                r["step_time_vs_marglik_reduce"] = r["seconds_per_marglik_step"] / base["seconds_per_marglik_step"]
    return rows


def to_markdown(result: Dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        "# Tuning-loop curvature backends on digits: marglik vs laplace-torch's curvlinops / ASDL / BackPACK",
        "",
        f"Generated by `scripts/run_tuning_backends.py`: digits ({s['train_size']} train / {s['test_size']} test), "
        f"no augmentation, layerwise prior, {s['epochs']} epochs (Adam, lr 3e-3, batch 64), a marglik update every "
        f"{s['frequency']} epochs after {s['burn_in']} burn-in epochs with {s['steps']} hypersteps (one Laplace fit "
        f"each: no augmentation), each fit on {s['marglik_batches']} random batches of 128 rescaled to N; type-2 GGN; "
        f"seed 0 for every run, so data order, marglik subsets and schedule are shared. Runs sequential in one "
        f"process, {s['threads']} torch thread(s), {s['device']}, torch {s['torch']}, laplace-torch {s['laplace']}.",
        "",
        "*s/step*: seconds per marglik step (Laplace fit + log marglik + gradient + Adam step), median over the "
        "run's fits (the machine is shared: the mean, in the JSON, catches other jobs' bursts); *vs reduce*: that time over marglik reduce's on the same model, in this process. *log ML / N*: each "
        "backend's own Laplace log marginal likelihood per example at the last update (a different curvature is a "
        "different estimate). Test metrics of the final (last-epoch) MAP model. Prior precisions: one per "
        "parameter tensor, in `model.parameters()` order (weight, bias per layer).",
        "",
    ]
    for model in s["models"]:
        lines += [f"## {model} ({s['model_kwargs'][model]})", "",
                  "| curvature | s/step | vs reduce | log ML / N | test acc | test NLL | prior precisions |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in result["runs"]:
            if r["model"] != model:
                continue
            if "error" in r:
                lines.append(f"| {r['curvature']} | not run | | | | | {r['error']} |")
                continue
            prec = ", ".join(f"{p:.3g}" for p in r["prior_precision"])
            lines.append(
                f"| {r['curvature']} | {r['seconds_per_marglik_step']:.3f} | {r['step_time_vs_marglik_reduce']:.2f} | "
                f"{r['log_marglik_per_example']:.4f} | {r['test_accuracy']:.4f} | {r['test_nll']:.4f} | {prec} |"
            )
        lines.append("")
    lines += [
        "Conventions: laplace-torch keeps weight and bias blocks separate (marglik couples them), so on the MLP "
        "curvlinops / ASDL / BackPACK kron are marglik expand without the weight-bias cross terms (equal log "
        "marglik to 1e-9 in `tests/test_tuning_backends.py`); the three diagonals are the same exact GGN "
        "diagonal. On convolutions ASDL and curvlinops expand equal marglik expand, BackPACK's KFLR would be "
        "(R A_expand) x B_reduce (`tests/test_backpack_kflr.py`).",
        "",
    ]
    return "\n".join(lines)


def plot(result: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["setup"]["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 3.8 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        runs = [r for r in result["runs"] if r["model"] == model and "error" not in r]
        ax = axes[i, 0]
        labels = [r["curvature"] for r in runs]
        ax.barh(labels, [r["seconds_per_marglik_step"] for r in runs],
                color=["C0" if r["backend"] == "marglik" else "C1" if r["structure"] == "kron" else "C2" for r in runs])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("seconds per marglik step (log)")
        for y, r in enumerate(runs):
            ax.text(r["seconds_per_marglik_step"], y, f" acc {r['test_accuracy']:.3f}", va="center", fontsize=7)
        ax.set_title(f"{model}: step time (blue marglik, orange peer kron, green peer diag)", fontsize=9)
        ax = axes[i, 1]
        for r in runs:
            style = "-" if r["backend"] == "marglik" else "--" if r["structure"] == "kron" else ":"
            ax.plot(r["prior_precision"], style, marker=".", label=r["curvature"])
        ax.set_yscale("log")
        ax.set_xlabel("parameter tensor (weight, bias per layer)")
        ax.set_ylabel("learned prior precision")
        ax.set_title(f"{model}: learned layerwise prior precisions", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--burn-in", type=int, default=5)
    ap.add_argument("--frequency", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--marglik-batches", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 epochs, 2 hypersteps: a smoke test")
    ap.add_argument("--out", default=str(REPO / "results"))
    ap.add_argument("--run-root", default=None, help="run directories (default: a temporary folder)")
    ap.add_argument("--from-json", action="store_true",
                    help="only re-render <out>/tuning_backends.{md,png} from <out>/tuning_backends.json")
    args = ap.parse_args(argv)
    if args.from_json:
        return rerender(Path(args.out), STEM, to_markdown, plot)
    if args.quick:
        args.epochs, args.burn_in, args.frequency, args.steps, args.marglik_batches = 3, 1, 1, 2, 1
    args.run_root = args.run_root or tempfile.mkdtemp(prefix="tuning_backends_")

    import laplace
    import torch

    from marglik.data import load_dataset

    t0 = time.perf_counter()
    rows = run_all(args)
    train, test, _ = load_dataset("digits", seed=0)
    result = {
        "setup": {
            "data": "digits", "train_size": len(train), "test_size": len(test), "models": args.models,
            "model_kwargs": {m: MODELS[m] for m in args.models}, "epochs": args.epochs, "burn_in": args.burn_in,
            "frequency": args.frequency, "steps": args.steps, "marglik_batches": args.marglik_batches,
            "threads": args.threads, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "laplace": getattr(laplace, "__version__", "0.3"), "quick": args.quick,
            "total_seconds": time.perf_counter() - t0,
        },
        "runs": rows,
    }
    write_outputs(Path(args.out), STEM, result, to_markdown, plot, indent=2)
    print(to_markdown(result))
    print(f"total {result['setup']['total_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
