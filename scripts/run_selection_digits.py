#!/usr/bin/env python
"""Selection on a fixed estimator, on the default job as it was before issue #28 (``marglik`` with the
protocol :data:`benchlib.V0_PROTOCOL`: digits, small CNN, K-FAC-reduce, layerwise prior, learned augmentation,
50 epochs, 5 burn-in, 2 type-2 hypersteps on 4 random batches of 128, the whole-set selection value
after every update; today's default scores a fixed 512-example subset every 5th update,
``results/marglik_vs_grid.md``).

Three questions, one process, all runs sequential with ``--threads`` torch threads (default 1):

1. **Hyperstep estimate vs selection value, per epoch** (the default job as the CLI runs it,
   ``hyper.selection=full``): the stochastic estimate of the hyperstep (4 random batches, fresh
   augmentation noise, before the last step) next to the selection value (whole training set,
   fixed noise, after the update), the epoch each would select, and how far apart they are.
2. **The learned model under laplace-torch's own estimator**, against laplace-torch's
   ``marglik_training`` on the same job. laplace-torch has no learned augmentation, so these runs
   are the default job with ``hyper.augmentation=false``: the same CNN and initial weights
   (``trainer.seed``), split, batch order (our data stream drives its sampler), MAP schedule
   (Adam, cosine to ``lr_min`` per step), prior term, hyper lr and number of marglik updates
   (``n_epochs_burnin = burn_in + 1``: updates after epochs ``burn_in + 1 .. epochs``). Ours runs
   with ``curvature.separate_bias`` off (joint ``[W, b]`` blocks) and on (laplace-torch's blocks),
   with the default K-FAC-reduce and with K-FAC-expand (laplace-torch's ASDL flavour).
   Every final model (ours: the best-selection-value checkpoint; laplace-torch's: the model
   ``marglik_training`` returns, selected on its own hyperstep value) is scored by laplace-torch's
   estimator: ``Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
   backend=AsdlGGN)`` -- ``marglik_training``'s default backend, K-FAC-expand -- fitted on the whole
   training set with the model's learned prior precision, ``log_marginal_likelihood()``; and by
   ours (:class:`marglik.KronLaplace`, reduce, joint and separate blocks) on the same data; ours
   with expand and separate blocks is laplace-torch's estimator by construction (a check).
3. What the fixed estimator costs: seconds of one selection value / seconds of one hyperstep
   (fit + value + gradient), measured in the runs of this process (ratios, not absolute times).

Writes ``results/selection_digits.{md,json}`` (the markdown rendered from the JSON alone:
``--from-json`` re-renders it). About 7 minutes of one CPU thread.

    python scripts/run_selection_digits.py
    python scripts/run_selection_digits.py --epochs 8 --out /tmp/sel   # smoke test
    python scripts/run_selection_digits.py --from-json                 # re-render the markdown
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from torch.utils.data import DataLoader, Sampler, TensorDataset  # noqa: E402

from marglik import KronLaplace  # noqa: E402
from marglik.tuning import Config, MarglikTuner  # noqa: E402
from marglik.tuning.seeds import Stream, stream_generator  # noqa: E402

from benchlib import ROOT as REPO  # noqa: E402
from benchlib import V0_PROTOCOL  # noqa: E402
from runner import portable_argv, rerender, write_outputs  # noqa: E402

STEM = "selection_digits"


class _StreamSampler(Sampler):
    """Every epoch the permutation our MAP loop draws (``Stream.data`` of the seed)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.gen = n, stream_generator(seed, Stream.data)

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.gen).tolist())

    def __len__(self) -> int:
        return self.n


def laplace_torch_lml(model: torch.nn.Module, X, y, prior_precision: torch.Tensor) -> float:
    """laplace-torch's estimator: Kron Laplace (AsdlGGN, K-FAC-expand), whole training set."""
    from laplace import Laplace
    from laplace.curvature import AsdlGGN

    model.eval()
    la = Laplace(copy.deepcopy(model), "classification", subset_of_weights="all", hessian_structure="kron",
                 backend=AsdlGGN, prior_precision=prior_precision.detach().clone())
    la.fit(DataLoader(TensorDataset(X, y), batch_size=256))
    return la.log_marginal_likelihood().item()


def ours_lml(model: torch.nn.Module, X, y, prior_precision: torch.Tensor, separate_bias: bool,
             approx: str = "reduce") -> float:
    """marglik's estimator (KronLaplace, K-FAC-reduce by default) on the whole training set."""
    model.eval()
    la = KronLaplace(model, "classification", approx=approx, prior_precision=prior_precision.detach().clone(),
                     separate_bias=separate_bias)
    la.fit([(X[i:i + 256], y[i:i + 256]) for i in range(0, len(X), 256)])
    return la.log_marginal_likelihood().item()


def base_config(args, **sections) -> Config:
    d: Dict[str, Any] = {"trainer": {"epochs": args.epochs, "progress": False, "num_threads": args.threads,
                                     "device": "cpu"},
                         "logger": {"mode": "disabled"}, **{k: dict(v) for k, v in V0_PROTOCOL.items()}}
    for key, val in sections.items():
        d[key] = {**d.get(key, {}), **val}
    return Config.from_dict(**d)


def per_example(v):
    return None if v is None else v


def run_default(args, root: Path) -> Dict[str, Any]:
    cfg = base_config(args)
    t = MarglikTuner(cfg, root / "default")
    s = t.fit()
    rows = [r for r in t.history if r["log_marglik"] is not None]
    N = t.N
    epochs = [{"epoch": int(r["epoch"]), "hyperstep": r["hyperstep_log_marglik"] / N, "selection": r["log_marglik"] / N,
               "prior_prec_mean": r["prior_prec_mean"], "aug_rotation": r["aug_rotation"]} for r in rows]
    by_hyper = max(epochs, key=lambda e: e["hyperstep"])
    gaps = [e["hyperstep"] - e["selection"] for e in epochs]
    steps = [e2["selection"] - e1["selection"] for e1, e2 in zip(epochs, epochs[1:])]
    hsteps = [e2["hyperstep"] - e1["hyperstep"] for e1, e2 in zip(epochs, epochs[1:])]
    sel_s = t.timing.get("selection_seconds") or []
    hyp_s = t.timing["marglik_step_seconds"]
    return {
        "config": "CLI default (digits, cnn, reduce-reduce, layerwise, learned augmentation S=8)",
        "N": N, "epochs": epochs, "selected_epoch": s["best_epoch"],
        "selected_epoch_by_hyperstep_estimate": by_hyper["epoch"],
        "selection_at_selected": s["log_marglik_per_example"],
        "selection_at_hyperstep_pick": next(e["selection"] for e in epochs if e["epoch"] == by_hyper["epoch"]),
        "max_hyperstep_estimate": by_hyper["hyperstep"],
        "gap_mean": sum(gaps) / len(gaps), "gap_abs_max": max(abs(g) for g in gaps),
        "step_abs_mean_selection": sum(abs(v) for v in steps) / max(1, len(steps)),
        "step_abs_mean_hyperstep": sum(abs(v) for v in hsteps) / max(1, len(hsteps)),
        "test_accuracy": s["test_accuracy"], "selection_estimator": s["selection_estimator"],
        "marglik_estimator": s["marglik_estimator"],
        "selection_over_hyperstep_seconds": (sum(sel_s) / len(sel_s)) / (sum(hyp_s) / len(hyp_s)) if sel_s else None,
    }


def run_comparison(args, root: Path) -> Dict[str, Any]:
    from laplace import marglik_training
    from laplace.curvature import AsdlGGN

    out: Dict[str, Any] = {"runs": []}
    lt_init = None
    for approx, separate in (("reduce", False), ("reduce", True), ("expand", False), ("expand", True)):
        cfg = base_config(args, hyper={"augmentation": False},
                          curvature={"separate_bias": separate, "approx": approx, "copies_approx": approx})
        t = MarglikTuner(cfg, root / f"noaug_{approx}_sepbias{int(separate)}")
        if lt_init is None:
            lt_init = (copy.deepcopy(t.model), t.X, t.y, t.X_test, t.y_test, cfg)
            out["parameters"] = [n for n, p in t.model.named_parameters() if p.requires_grad]
        s = t.fit()  # finalize loads the best-selection-value model and prior
        prior = t.prior_precision().detach()
        out["runs"].append({
            "model": f"ours, {approx}{' (default)' if approx == 'reduce' else ''}, "
                     f"separate_bias={'true' if separate else 'false'}",
            "selected_epoch": s["best_epoch"], "test_accuracy": s["test_accuracy"],
            "own_selection_value": s["log_marglik_per_example"],
            "laplace_torch_lml": laplace_torch_lml(t.model, t.X, t.y, prior) / t.N,
            "ours_joint_lml": ours_lml(t.model, t.X, t.y, prior, False) / t.N,
            "ours_separate_lml": ours_lml(t.model, t.X, t.y, prior, True) / t.N,
            "ours_expand_separate_lml": ours_lml(t.model, t.X, t.y, prior, True, "expand") / t.N,
            "prior_precision": prior.tolist(),
        })
    model, X, y, X_test, y_test, cfg = lt_init
    c = cfg
    N = len(X)
    loader = DataLoader(TensorDataset(X, y), batch_size=c.trainer.batch_size, sampler=_StreamSampler(N, c.trainer.seed))
    bpe = math.ceil(N / c.trainer.batch_size)
    torch.manual_seed(c.trainer.seed)
    lap, lt_model, margliks, _ = marglik_training(
        model, loader, likelihood="classification", hessian_structure="kron", backend=AsdlGGN,
        optimizer_kwargs={"lr": c.trainer.lr}, scheduler_cls=torch.optim.lr_scheduler.CosineAnnealingLR,
        scheduler_kwargs={"T_max": c.trainer.epochs * bpe, "eta_min": c.trainer.lr_min}, n_epochs=c.trainer.epochs,
        lr_hyp=c.hyper.lr, prior_structure="layerwise", n_epochs_burnin=c.hyper.burn_in + 1,
        n_hypersteps=c.hyper.steps, marglik_frequency=c.hyper.frequency, prior_prec_init=c.hyper.prior_prec_init,
    )
    prior = lap.prior_precision.detach()
    lt_model.eval()
    with torch.no_grad():
        acc = (lt_model(X_test).argmax(-1) == y_test).float().mean().item()
    updates = len(margliks) // c.hyper.steps
    per_update = [-margliks[(k + 1) * c.hyper.steps - 1] / N for k in range(updates)]
    out["runs"].append({
        "model": "laplace-torch marglik_training (AsdlGGN kron)",
        "selected_epoch": c.hyper.burn_in + 1 + max(range(updates), key=lambda k: per_update[k]),
        "test_accuracy": acc, "own_selection_value": max(per_update),
        "laplace_torch_lml": laplace_torch_lml(lt_model, X, y, prior) / N,
        "ours_joint_lml": ours_lml(lt_model, X, y, prior, False) / N,
        "ours_separate_lml": ours_lml(lt_model, X, y, prior, True) / N,
        "ours_expand_separate_lml": ours_lml(lt_model, X, y, prior, True, "expand") / N,
        "prior_precision": prior.tolist(), "marglik_updates": updates,
    })
    out["marglik_updates_ours"] = c.marglik_updates()
    ref = out["runs"][-1]["prior_precision"]
    for r in out["runs"]:
        ratios = [a / b for a, b in zip(r["prior_precision"], ref)]
        r["prior_ratio_to_laplace_torch_min"], r["prior_ratio_to_laplace_torch_max"] = min(ratios), max(ratios)
        r["laplace_torch_lml_minus_laplace_torch_model"] = r["laplace_torch_lml"] - out["runs"][-1]["laplace_torch_lml"]
    return out


def fmt(v, spec=".4f"):
    return "--" if v is None else format(v, spec)


def render(res: Dict[str, Any]) -> str:
    """The report, from the result JSON alone."""
    d, comp = res["default"], res["comparison"]
    lines = [
        "# Selection on a fixed estimator: the default digits job",
        "",
        f"Generated by `{res['command']}` on {res['date']} ({res['machine']}; load average "
        f"{res['load_before']} before, {res['load_after']} after; {res['threads']} torch thread). "
        "All values are log marginal likelihoods **per training example** (nats / N).",
        "",
        "## 1. Hyperstep estimate vs selection value, per epoch (default job, `hyper.selection=full`)",
        "",
        f"Hyperstep estimate: {d['marglik_estimator']}; the value of the last hyperstep, before its step. "
        f"Selection value: {d['selection_estimator']}.",
        "",
        "| epoch | hyperstep estimate / N | selection value / N | difference | mean prior precision | rotation (deg) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for e in d["epochs"]:
        mark = " **(selected)**" if e["epoch"] == d["selected_epoch"] else ""
        mark += " (argmax of the estimate)" if e["epoch"] == d["selected_epoch_by_hyperstep_estimate"] else ""
        lines.append(f"| {e['epoch']}{mark} | {e['hyperstep']:.4f} | {e['selection']:.4f} | "
                     f"{e['hyperstep'] - e['selection']:+.4f} | {e['prior_prec_mean']:.3g} | {e['aug_rotation']:.1f} |")
    N = d["N"]
    lines += [
        "",
        f"- Selected epoch (argmax of the selection value): **{d['selected_epoch']}** "
        f"(selection value {d['selection_at_selected']:.4f}/N). The argmax of the hyperstep estimate, what the loop "
        f"selected on before, is epoch {d['selected_epoch_by_hyperstep_estimate']} (selection value there "
        f"{d['selection_at_hyperstep_pick']:.4f}/N). The value that would have been reported, the largest "
        f"hyperstep estimate ({d['max_hyperstep_estimate']:.4f}/N), is "
        f"{d['max_hyperstep_estimate'] - d['selection_at_hyperstep_pick']:+.4f}/N above the selection value of "
        f"its own epoch and {d['max_hyperstep_estimate'] - d['selection_at_selected']:+.4f}/N above the selected one.",
        f"- Hyperstep estimate minus selection value: mean {d['gap_mean']:+.4f}/N, largest "
        f"{d['gap_abs_max']:.4f}/N ({d['gap_abs_max'] * N:.1f} nats at N={N}).",
        f"- Mean absolute change from one update to the next: selection value {d['step_abs_mean_selection']:.4f}/N, "
        f"hyperstep estimate {d['step_abs_mean_hyperstep']:.4f}/N.",
        f"- Cost: one selection value takes {fmt(d['selection_over_hyperstep_seconds'], '.2f')}x the time of one "
        "hyperstep (fit on 512 examples + value + gradient), measured in this run.",
        "",
        "## 2. The learned models under laplace-torch's estimator (default job without augmentation)",
        "",
        "laplace-torch has no learned augmentation, so this compares the default job with "
        "`hyper.augmentation=false`: same CNN, initial weights, split, batch order, MAP schedule, "
        f"hyper lr and number of marglik updates ({comp['marglik_updates_ours']} each). Columns: the run's own "
        "selection value (ours: whole set, the run's K-FAC flavour and blocks; laplace-torch: its best hyperstep "
        "value, whole set, K-FAC-expand via ASDL); **laplace-torch's estimator** (`Laplace(..., hessian_structure="
        "'kron', backend=AsdlGGN)` fitted on the whole training set with the model's learned prior precision); "
        "ours (K-FAC-reduce) with joint and with separate blocks on the same model and prior; ours with "
        "K-FAC-expand and separate blocks (laplace-torch's structure: must equal its column, a check); the "
        "learned prior precisions "
        "relative to laplace-torch's (min and max over the 8 parameter tensors).",
        "",
        "| model | selected epoch | test acc | own selection / N | laplace-torch estimator / N | minus laplace-torch's model | "
        "ours joint / N | ours separate / N | ours expand separate / N | prior / laplace-torch's (min-max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in comp["runs"]:
        lines.append(
            f"| {r['model']} | {r['selected_epoch']} | {r['test_accuracy']:.4f} | {r['own_selection_value']:.4f} | "
            f"{r['laplace_torch_lml']:.4f} | {r['laplace_torch_lml_minus_laplace_torch_model']:+.4f} | "
            f"{r['ours_joint_lml']:.4f} | {r['ours_separate_lml']:.4f} | {r['ours_expand_separate_lml']:.4f} | "
            f"{r['prior_ratio_to_laplace_torch_min']:.2f}-{r['prior_ratio_to_laplace_torch_max']:.2f} |")
    names = comp["parameters"]
    lines += [
        "",
        "Learned prior precisions of the reported models, per parameter tensor:",
        "",
        "| model | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for r in comp["runs"]:
        lines.append(f"| {r['model']} | " + " | ".join(f"{v:.3g}" for v in r["prior_precision"]) + " |")
    lines += [
        "",
        "Reading: a positive 'minus laplace-torch's model' means our model has the higher log marginal "
        "likelihood under laplace-torch's own estimator. The joint and separate columns on one row differ only in "
        "the weight-bias cross terms of the Kronecker blocks (the same model and prior).",
        "",
    ]
    return "\n".join(lines)


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=Config().trainer.epochs)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "results")
    p.add_argument("--run-root", type=Path, default=None)
    p.add_argument("--from-json", action="store_true", help="only re-render <out>/selection_digits.md from its JSON")
    args = p.parse_args(argv)
    if args.from_json:
        rerender(args.out, STEM, render)
        return
    torch.set_num_threads(args.threads)
    root = args.run_root or Path(tempfile.mkdtemp(prefix="selection_digits_"))
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    res: Dict[str, Any] = {
        "command": "python " + " ".join(
            shlex.quote(a) for a in [f"scripts/{Path(__file__).name}", *portable_argv(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, shared with other jobs",
        "threads": args.threads, "epochs": args.epochs, "load_before": load_before,
    }
    t0 = time.perf_counter()
    res["default"] = run_default(args, root)
    res["comparison"] = run_comparison(args, root)
    res["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    res["wall_minutes"] = (time.perf_counter() - t0) / 60
    write_outputs(args.out, STEM, res, render, indent=2)
    print(f"wrote {args.out / 'selection_digits.md'} ({res['wall_minutes']:.1f} min)")


if __name__ == "__main__":
    main()
