#!/usr/bin/env python
"""A whole tuning run against the validation grid search it replaces: cost and quality (issue #28).

For each setting (upright digits, ``data.rotation=90``) and seed this measures, one single-threaded
job after another in ``--workers`` processes (each job's *process CPU seconds*):

* ``grid``: the practitioner's baseline (:mod:`marglik.tuning.grid_search`): 5 weight decays x 5
  rotation ranges trained on a fixed stratified 80 % split, picked by validation NLL (and what
  validation accuracy would pick), the pick retrained on all training data and scored on the test
  set plainly and averaged over 8 rotations (as a tuning run's model predicts);
* ``hindsight``: every cell trained on all training data and scored on test: the best cell in
  hindsight, an upper bound, not a method (its cost is not the grid's);
* ``standard``: one *standard training* (the same network, fixed hyperparameters -- weight decay
  1e-3, rotation 30 degrees -- one augmented copy, the same epochs): the unit of cost;
* one marglik tuning run per protocol in :data:`PROTOCOLS` (``default``: the shipped defaults;
  ``sampled-label mc`` and ``type-2 fits``: the same with ``curvature.fisher_type=mc`` (the default
  before ``mc-root``) or ``type-2`` (the exact GGN);
  ``v0``: the defaults before issue #28; the others: points of the cost/quality frontier).

Writes ``results/marglik_vs_grid.{json,md,png}``; markdown and figure render from the JSON alone
(``--from-json``). ``--append`` keeps the jobs already in the JSON (a later sitting adds seeds or
protocols; cost ratios are always formed within one job group of the same sitting, see the report).

    python scripts/bench_vs_grid.py                      # the committed results (~1 h on 2 cores)
    python scripts/bench_vs_grid.py --quick --out /tmp/g # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from benchlib import RESULTS, V0_PROTOCOL
from runner import portable_argv, read_json, render_outputs, run_pool, write_outputs

STEM = "marglik_vs_grid"
WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
ROTATIONS = (0.0, 30.0, 60.0, 90.0, 180.0)
TEST_COPIES = 8
STANDARD = {"weight_decay": 1e-3, "degrees": 30.0}
def _merge(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in a.items()}
    for k, v in b.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


_V0 = _merge(V0_PROTOCOL, {"curvature": {"approx": "reduce", "copies_approx": "reduce"}})
#: the protocol the frontier's knobs were measured from: the shipped default but ``hyper.aug_lr=0.1`` and the
#: sampled-label MC Fisher (``mc``, the default until ``mc-root`` replaced it)
_MC = {"curvature": {"fisher_type": "mc"}}
_BASE = _merge(_MC, {"hyper": {"aug_lr": 0.1}})
#: one knob of ``_BASE`` changed at a time (the frontier's points)
_KNOBS: Dict[str, Dict[str, Any]] = {
    "expand-reduce": {"curvature": {"approx": "expand"}},
    "type-2 fits": {"curvature": {"fisher_type": "type-2"}},
    "constant hyper lr": {"hyper": {"schedule": "constant"}},
    "selection full, every update": {"hyper": {"selection": "full", "selection_every": 1}},
    "update every 2nd epoch": {"hyper": {"frequency": 2}},
    "+3 prior-only steps": {"hyper": {"prior_steps": 3}},
    "S=4 copies": {"hyper": {"n_samples": 4}},
}
#: name -> config overrides of a marglik run (over the shipped defaults); ``default`` is the shipped default
PROTOCOLS: Dict[str, Dict[str, Any]] = {
    "default": {},
    "sampled-label mc": _MC,
    "type-2 fits": {"curvature": {"fisher_type": "type-2"}},
    "v0": _V0,
    "v0 + train_samples=1, cosine": {"hyper": {**_V0["hyper"], "train_samples": 1, "schedule": "cosine"},
                                     "curvature": _V0["curvature"]},
    "mc, aug_lr=0.1": _BASE,
    **{f"mc, aug_lr=0.1, {k}": _merge(_BASE, v) for k, v in _KNOBS.items()},
}


def protocol(name: str) -> Dict[str, Any]:
    """A protocol's overrides: :data:`PROTOCOLS`, or ``key=value,key=value`` over the defaults."""
    if name in PROTOCOLS:
        return PROTOCOLS[name]
    out: Dict[str, Any] = {}
    for item in name.split(","):
        key, _, value = item.partition("=")
        section, field = key.split(".")
        v: Any = value
        for cast in (int, float):
            try:
                v = cast(value)
                break
            except ValueError:
                pass
        v = {"null": None, "true": True, "false": False}.get(value, v)
        out.setdefault(section, {})[field] = v
    return out


_WARM = []


def _warm_up() -> None:
    """Once per worker process, before any timing: a tiny tuning run and a tiny fixed training, so that
    no job is charged the process's one-off start-up costs (imports, first calls of each kernel)."""
    if _WARM:
        return
    import tempfile

    from marglik.tuning import Config
    from marglik.tuning.build import build_parts
    from marglik.tuning.trainer import Trainer

    cfg = Config.from_dict({"data": {"train_size": 128}, "trainer": {"epochs": 2, "progress": False,
                                                                       "cost_reference": False},
                            "hyper": {"burn_in": 1, "marglik_batches": 1, "selection": "subset", "selection_size": 64},
                            "logger": {"mode": "disabled"}})
    with tempfile.TemporaryDirectory() as d:
        Trainer(build_parts(cfg), d).fit()
    _WARM.append(True)


def job(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One job in this worker (one torch thread); returns its record with ``cpu_seconds``."""
    import torch

    torch.set_num_threads(1)
    from marglik.data import load_dataset
    from marglik.tuning import Config
    from marglik.tuning.grid_search import delta_from_weight_decay, pick, score, stratified_split, train_fixed
    from marglik.tuning.parts import TensorData

    rec = {k: spec[k] for k in ("name", "setting", "seed", "kind", "protocol") if k in spec}
    epochs = spec["epochs"]
    _warm_up()
    base = Config.from_dict({"trainer": {"epochs": epochs}})
    train, test, info = load_dataset("digits", rotation=float(spec["setting"]), seed=0)
    full = TensorData.from_datasets(train, test, info, torch.device("cpu"), name="digits")
    seed, kind = spec["seed"], spec["kind"]
    t0 = time.process_time()
    if kind in ("grid", "hindsight"):
        if kind == "grid":
            tr, va = stratified_split(full.y, 0.2, seed=0)
            data = TensorData(full.X[tr], full.y[tr], full.X[va], full.y[va], info, "digits")
        else:
            data = full
        cells = []
        for wd in spec.get("weight_decays", WEIGHT_DECAYS):
            for deg in spec.get("rotations", ROTATIONS):
                c0 = time.process_time()
                model = train_fixed(data, "cnn", {}, delta_from_weight_decay(wd, data.N), deg, base.trainer, seed)
                s = score(model, data.X_test, data.y_test)
                cells.append({"weight_decay": wd, "rotation": deg, "nll": s["nll"], "acc": s["acc"],
                              "cpu_seconds": time.process_time() - c0})
        rec["cells"] = cells
        if kind == "grid":
            by_nll = pick(cells, "nll")
            by_acc = pick(cells, "acc")
            c0 = time.process_time()
            model = train_fixed(full, "cnn", {}, delta_from_weight_decay(by_nll["weight_decay"], full.N),
                                by_nll["rotation"], base.trainer, seed)
            rec["retrain_cpu_seconds"] = time.process_time() - c0
            rec["pick"] = {"weight_decay": by_nll["weight_decay"], "rotation": by_nll["rotation"]}
            rec["pick_by_val_acc"] = {"weight_decay": by_acc["weight_decay"], "rotation": by_acc["rotation"]}
            rec["test"] = score(model, full.X_test, full.y_test)
            rec["test_averaged"] = score(model, full.X_test, full.y_test, by_nll["rotation"], TEST_COPIES, seed)
        else:
            best = pick(cells, "nll")
            rec["best"] = {"weight_decay": best["weight_decay"], "rotation": best["rotation"],
                           "nll": best["nll"], "acc": best["acc"]}
    elif kind == "standard":
        model = train_fixed(full, "cnn", {}, delta_from_weight_decay(STANDARD["weight_decay"], full.N),
                            STANDARD["degrees"], base.trainer, seed)
        rec["test"] = score(model, full.X_test, full.y_test)
    else:  # a marglik tuning run
        import tempfile

        from marglik.tuning.build import build_parts
        from marglik.tuning.trainer import Trainer

        over = _merge(protocol(spec["protocol"]), {
            "data": {"rotation": float(spec["setting"])}, "trainer": {"seed": seed, "epochs": epochs, "progress": False,
                                                                     "cost_reference": False},
            "logger": {"mode": "disabled"}})
        cfg = Config.from_dict(over)
        with tempfile.TemporaryDirectory() as d:
            summary = Trainer(build_parts(cfg, data=full), d).fit()
        rec["overrides"] = protocol(spec["protocol"])
        rec["test"] = {"acc": summary["test_accuracy"], "nll": summary["test_nll"]}
        rec["rotation_learned"] = summary["augmentation"].get("rotation", 0.0)
        rec["log_marglik_per_example"] = summary["log_marglik_per_example"]
        rec["best_epoch"] = summary["best_epoch"]
        rec["cost_split"] = summary["cost"]
        rec["n_hypersteps"] = summary["n_hypersteps"]
    rec["cpu_seconds"] = time.process_time() - t0
    return rec


def _key(r: Dict[str, Any]) -> tuple:
    return (r.get("sitting", 0), r["setting"], r["seed"], r["kind"], r.get("protocol") or "")


def units(data: Dict[str, Any]) -> Dict[tuple, float]:
    """Seconds of one standard training per (sitting, setting, seed): the ``standard`` job of the same
    sitting (one invocation of this script; CPU seconds of the same work differ between sittings by
    the machine's load), so every cost is a ratio measured in one sitting."""
    return {(r.get("sitting", 0), r["setting"], r["seed"]): r["cpu_seconds"]
            for r in data["jobs"] if r["kind"] == "standard"}


def _mean(xs: List[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def _sd(xs: List[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise(data: Dict[str, Any]) -> Dict[str, Any]:
    """Per setting and method: means over seeds of test NLL / accuracy, cost in standard trainings."""
    unit = units(data)
    rows: Dict[tuple, Dict[str, List[float]]] = {}

    def add(setting: float, method: str, seed: int, **vals: float) -> None:
        d = rows.setdefault((setting, method), {})
        d.setdefault("seeds", []).append(seed)
        for k, v in vals.items():
            d.setdefault(k, []).append(v)

    for r in data["jobs"]:
        u = unit.get((r.get("sitting", 0), r["setting"], r["seed"]))
        if u is None or "error" in r:
            continue
        s, seed = r["setting"], r["seed"]
        if r["kind"] == "grid":
            cost = (r["cpu_seconds"]) / u
            add(s, "grid (val. NLL pick, retrained)", seed, nll=r["test"]["nll"], acc=r["test"]["acc"], cost=cost,
                rotation=r["pick"]["rotation"])
            add(s, f"grid, averaged over {TEST_COPIES} rotations at test", seed, nll=r["test_averaged"]["nll"],
                acc=r["test_averaged"]["acc"], cost=cost, rotation=r["pick"]["rotation"])
        elif r["kind"] == "hindsight":
            add(s, "best cell in hindsight (bound)", seed, nll=r["best"]["nll"], acc=r["best"]["acc"],
                cost=r["cpu_seconds"] / u, rotation=r["best"]["rotation"])
        elif r["kind"] == "marglik":
            add(s, f"marglik {r['protocol']}", seed, nll=r["test"]["nll"], acc=r["test"]["acc"],
                cost=r["cpu_seconds"] / u, rotation=r["rotation_learned"])
    out = []
    for (s, method), d in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        out.append({"setting": s, "method": method, "seeds": d["seeds"],
                    **{f"{k}_mean": _mean(d[k]) for k in ("nll", "acc", "cost", "rotation")},
                    **{f"{k}_sd": _sd(d[k]) for k in ("nll", "acc", "cost")},
                    "rotation_min": min(d["rotation"]), "rotation_max": max(d["rotation"])})
    return {"rows": out}


def render(data: Dict[str, Any]) -> str:
    summ = summarise(data)
    lines = ["# A tuning run against the validation grid search it replaces", "",
             f"Digits, `model=cnn`, {data['epochs']} epochs, seeds {sorted({r['seed'] for r in data['jobs']})}; "
             "every job single-threaded, cost in process CPU seconds divided by the same seed and setting's "
             "*standard training* (the same network, fixed hyperparameters, one augmented copy, the same epochs). "
             "Sittings (each an invocation with its own standard trainings, numbered from 0 in this order): "
             + "; ".join(f"`{c}`" for c in data["commands"] if "--merge" not in c) + ".", "",
             f"Grid: weight decay {list(data['weight_decays'])} (prior precision delta = wd x N) x rotation range "
             f"{list(data['rotations'])} degrees, one fresh random rotation per example per step, fixed stratified "
             "80/20 split, pick by validation NLL, retrain the pick on all training data. The bound trains every "
             "cell on all data and picks by test NLL (not a method).", "",
             "| data.rotation | method | seeds | test NLL | test acc | cost (standard trainings) | rotation (deg): marglik learned, mean (min-max); grid picked, mean |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for r in summ["rows"]:
        rot = (f"{r['rotation_mean']:.1f} ({r['rotation_min']:.1f}-{r['rotation_max']:.1f})" if r["method"].startswith("marglik")
               else f"{r['rotation_mean']:.0f}")
        lines.append(f"| {r['setting']:g} | {r['method']} | {len(r['seeds'])} | {r['nll_mean']:.4f} +- {r['nll_sd']:.4f} "
                     f"| {r['acc_mean']:.4f} +- {r['acc_sd']:.4f} | {r['cost_mean']:.2f} +- {r['cost_sd']:.2f} | {rot} |")
    lines += ["", "Protocols (overrides over the shipped defaults):", ""]
    for name, over in data["protocols"].items():
        lines.append(f"- `{name}`: `{over}`")
    lines += ["", "Where each marglik run's time went (wall seconds of its own record, `summary.json['cost']`, "
              "as shares of the run):", "",
              "| data.rotation | protocol | seed | MAP | hypersteps (fit / log det / gradient) | selection | evaluation |",
              "|---:|---|---:|---:|---|---:|---:|"]
    for r in sorted((r for r in data["jobs"] if r["kind"] == "marglik" and "error" not in r), key=_key):
        c = r["cost_split"]
        tot = c["seconds"] or 1.0
        ph = c["hyperstep_phase_seconds"]
        lines.append(f"| {r['setting']:g} | {r['protocol']} | {r['seed']} | {c['map_seconds'] / tot:.2f} | "
                     f"{c['hyperstep_seconds'] / tot:.2f} ({ph.get('fit', 0) / tot:.2f} / {ph.get('log_marglik', 0) / tot:.2f}"
                     f" / {ph.get('gradient', 0) / tot:.2f}) | {c['selection_seconds'] / tot:.2f} | "
                     f"{c['eval_seconds'] / tot:.2f} |")
    errors = [r for r in data["jobs"] if "error" in r]
    if errors:
        lines += ["", "Failed jobs:", ""] + [f"- {_key(r)}: {r['error']}" for r in errors]
    if data.get("note"):
        lines += ["", data["note"]]
    return "\n".join(lines) + "\n"


def _short(method: str) -> str:
    """A figure label: the knob of a frontier point (its base, ``mc, aug_lr=0.1``, named once), the grid's variants."""
    m = method.replace("marglik ", "")
    if m.startswith("mc, aug_lr=0.1, "):
        return m[len("mc, aug_lr=0.1, "):]
    return {"mc, aug_lr=0.1": "base (mc, aug_lr=0.1)", "type-2 fits": "default, type-2", "sampled-label mc":
            "default, sampled-label mc", "grid (val. NLL pick, retrained)": "grid",
            f"grid, averaged over {TEST_COPIES} rotations at test": f"grid, {TEST_COPIES} rotations at test",
            "best cell in hindsight (bound)": "hindsight bound"}.get(m, m)


def plot(data: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summarise(data)["rows"]
    settings = sorted({r["setting"] for r in summ})
    if not settings:  # nothing scored yet (no standard training finished)
        return
    fig, axes = plt.subplots(1, len(settings), figsize=(7 * len(settings), 5.5), squeeze=False)
    for ax, s in zip(axes[0], settings):
        for r in (r for r in summ if r["setting"] == s):
            m = r["method"]
            label = _short(m)
            default = m == "marglik default"
            marker = "*" if default else "o" if m.startswith("marglik") else ("s" if m.startswith("grid") else "^")
            ax.errorbar(r["cost_mean"], r["nll_mean"], xerr=r["cost_sd"], yerr=r["nll_sd"], fmt=marker, capsize=3,
                        markersize=12 if default else 6, color="crimson" if default else None, label=label)
            ax.annotate(label, (r["cost_mean"], r["nll_mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points",
                        fontweight="bold" if default else "normal")
        ax.set_xscale("log")
        ax.set_xlabel("run cost (standard trainings, log scale)")
        ax.set_ylabel("test NLL")
        ax.set_title(f"digits, data.rotation={s:g}: test NLL against run cost (means +- sd over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: List[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", type=float, nargs="+", default=[0.0, 90.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS),
                    help="names in PROTOCOLS or key=value,key=value overrides")
    ap.add_argument("--kinds", nargs="+", default=["standard", "grid", "hindsight", "marglik"])
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true", help="keep the jobs already in the JSON")
    ap.add_argument("--from-json", action="store_true")
    ap.add_argument("--note", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny grid and 3 epochs (smoke test)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="add the jobs of these result JSONs (other sittings on this machine, each with its own standard "
                         "trainings) to --out's JSON")
    a = ap.parse_args(argv)
    if a.merge:
        data = read_json(a.out, STEM)
        for path in a.merge:
            other = json.loads(Path(path).read_text())
            sitting = 1 + max((r.get("sitting", 0) for r in data["jobs"]), default=0)
            data["jobs"] = sorted(data["jobs"] + [{**r, "sitting": sitting} for r in other["jobs"]], key=_key)
            data["commands"] = [*data.get("commands", []), *other.get("commands", [])]
            data["protocols"] = {**data.get("protocols", {}), **other.get("protocols", {})}
        write_outputs(a.out, STEM, data, render, plot)
        return
    if a.from_json:
        data = read_json(a.out, STEM)
        if a.note is not None:
            data["note"] = a.note
            write_outputs(a.out, STEM, data, render, plot)
        else:
            render_outputs(a.out, STEM, data, render, plot)
        return
    extra = {"weight_decays": [1e-3], "rotations": [0.0, 90.0]} if a.quick else {}
    epochs = 3 if a.quick else a.epochs
    jobs = []
    for s in a.settings:
        for seed in a.seeds:
            for kind in a.kinds:
                if kind == "marglik":
                    jobs += [{"name": f"{p[:20]} r{s:g} s{seed}", "setting": s, "seed": seed, "kind": kind,
                              "protocol": p, "epochs": epochs, **extra} for p in a.protocols]
                else:
                    jobs.append({"name": f"{kind} r{s:g} s{seed}", "setting": s, "seed": seed, "kind": kind,
                                 "epochs": epochs, **extra})
    old = read_json(a.out, STEM) if a.append and (a.out / f"{STEM}.json").exists() else {"jobs": []}
    new_keys = {_key(j) for j in jobs}
    kept = [r for r in old["jobs"] if _key(r) not in new_keys]
    protocols = {**old.get("protocols", {}), **{p: protocol(p) for p in a.protocols}}
    command = " ".join(["python", "scripts/bench_vs_grid.py", *portable_argv(argv)])
    data = {"commands": [*old.get("commands", []), command], "epochs": epochs,
            "weight_decays": list(extra.get("weight_decays", WEIGHT_DECAYS)),
            "rotations": list(extra.get("rotations", ROTATIONS)), "protocols": protocols,
            "note": a.note if a.note is not None else old.get("note"), "jobs": kept}

    def on_result(done: List[Dict[str, Any]]) -> None:
        data["jobs"] = kept + sorted(done, key=_key)
        write_outputs(a.out, STEM, data, render, plot)

    def describe(r: Dict[str, Any]) -> str:
        t = r.get("test") or r.get("best") or {}
        return f"{r['kind']} {r.get('protocol', '')} rot={r['setting']:g} s{r['seed']}: {r['cpu_seconds']:.1f} cpu-s " \
               f"nll={t.get('nll', float('nan')):.4f} rot={r.get('rotation_learned', float('nan')):.1f}"

    order = {"standard": 0, "marglik": 1, "grid": 2, "hindsight": 3}
    run_pool(sorted(jobs, key=lambda j: order[j["kind"]]), a.workers, on_result, fn=job, describe=describe)


if __name__ == "__main__":
    main(sys.argv[1:])
