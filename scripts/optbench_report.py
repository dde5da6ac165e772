"""Summary and report of ``bench_optimizer.py`` (a library module: no entry point): the
per-optimiser outcome, target-rule sensitivity and criteria of a task record (JSON -> JSON), and
the markdown and figure, rendered from the result JSON alone (no torch)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional

OPTIMIZERS = ("adamw", "kfac_expand", "kfac_reduce")
PAPER_RANGE = (0.50, 0.75)
CRITERIA = {"steps_ratio_max": 0.75, "seconds_ratio_max": 1.0, "all_seeds_reach": True}
SENSITIVITY_FRACS = (0.95, 0.96, 0.97, 0.98, 0.99)


# ----------------------------------------------------------------------------------------- formatting
def fmt_value(v: Any) -> str:
    """A hyperparameter value: floats in ``%g``, ``None`` (KL clipping off) as ``off``."""
    return "off" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def fmt_config(cfg: Dict[str, Any]) -> str:
    """``k=v`` list of a configuration (without the ViT's ``fallback_lr``)."""
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in cfg.items() if k != "fallback_lr")


def _finite(x: float, digits: Optional[int] = None) -> Optional[float]:
    if not math.isfinite(x):
        return None
    return round(x, digits) if digits is not None else x


# ----------------------------------------------------------------------------------------- summary (JSON -> JSON)
def _steps_to(curve: Dict[str, Any], target: float) -> float:
    return next((float(s) for s, a in zip(curve["steps"], curve["acc"]) if a >= target), math.inf)


def _seconds_to(curve: Dict[str, Any], target: float) -> float:
    return next((t for t, a in zip(curve["seconds"], curve["acc"]) if a >= target), math.inf)


def _median(values: List[float]) -> float:
    return float(statistics.median(values)) if values else math.inf


def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else None


def outcome(final: Dict[str, Any], target: float) -> Dict[str, Any]:
    """Per-optimiser medians, per-seed values and ratios to AdamW for one target accuracy, from
    ``final`` = ``{opt: {"runs": [curve, ...], "modelled_sec_per_step": s}}``."""
    out: Dict[str, Any] = {}
    for opt, fin in final.items():
        st = [_steps_to(c, target) for c in fin["runs"]]
        sec = [_seconds_to(c, target) for c in fin["runs"]]
        med = _median(st)
        out[opt] = {"steps_per_seed": [_finite(x) for x in st], "seconds_per_seed": [_finite(x, 3) for x in sec],
                    "steps": med, "seconds": _median(sec), "modelled_seconds": med * fin["modelled_sec_per_step"],
                    "reached": sum(map(math.isfinite, st)) / len(st)}
    base = dict(out["adamw"])
    for o in out.values():
        for k in ("steps", "seconds", "modelled_seconds"):
            o[f"{k}_ratio"] = _ratio(o[k], base[k])
        o["steps"], o["seconds"], o["modelled_seconds"] = (
            _finite(o["steps"]), _finite(o["seconds"], 3), _finite(o["modelled_seconds"], 3))
    return out


def summarise(rec: Dict[str, Any]) -> Dict[str, Any]:
    """Summary, target-rule sensitivity and benchmark criteria of a task record."""
    main = outcome(rec["final"], rec["target"]["val_acc"])
    for opt, fin in rec["final"].items():
        runs = fin["runs"]
        main[opt]["sec_per_step"] = statistics.median(c["sec_per_step"] for c in runs)
        main[opt]["best_acc_median"] = statistics.median(max(c["acc"], default=0.0) for c in runs)
        main[opt]["diverged"] = sum(c["diverged"] for c in runs)
        main[opt]["modelled_sec_per_step"] = fin["modelled_sec_per_step"]
    for opt in main:
        main[opt]["step_overhead"] = main[opt]["sec_per_step"] / main["adamw"]["sec_per_step"]
    sens = {f"{f:.2f}": dict(outcome(rec["final"], f * rec["target"]["base"]), target_val_acc=f * rec["target"]["base"])
            for f in SENSITIVITY_FRACS}
    criteria = {}
    for opt in OPTIMIZERS[1:]:
        m = main[opt]
        criteria[opt] = {
            "all_seeds_reach": m["reached"] == 1.0,
            "steps_ratio": m["steps_ratio"] is not None and m["steps_ratio"] <= CRITERIA["steps_ratio_max"],
            "seconds_ratio": m["seconds_ratio"] is not None and m["seconds_ratio"] <= CRITERIA["seconds_ratio_max"],
            "modelled_seconds_ratio": m["modelled_seconds_ratio"] is not None
            and m["modelled_seconds_ratio"] <= CRITERIA["seconds_ratio_max"],
        }
        criteria[opt]["met"] = all(criteria[opt].values())
    return {"summary": main, "target_sensitivity": sens, "criteria": criteria}


# ----------------------------------------------------------------------------------------- rendering (JSON only)
def _num(x: Optional[float], spec: str = ".0f", none: str = "x") -> str:
    return none if x is None else format(x, spec)


def render_markdown(result: Dict[str, Any]) -> str:
    """The report, from the result JSON alone."""
    meta = result["meta"]
    L = ["# Steps to a fixed validation target: AdamW vs K-FAC-expand vs K-FAC-reduce", "",
         f"Generated by `{meta['script']}` ({meta['total_seconds'] / 60:.0f} min on {meta['torch_threads']} torch "
         f"thread(s), shared CPU; re-render with `--from-json {meta['json']}`). Protocol in the script's docstring: "
         "one warm-up + cosine schedule family; each optimiser tuned by a coordinate search on sweep seeds "
         f"{meta['sweep_seeds']} (disjoint from the reported seeds {meta['seeds']}); a chosen value on its grid's "
         "edge widens the grid. Seconds are training time only (evaluation and batch preparation excluded); "
         "s/step is the mean over all steps.",
         f"Benchmark criteria: each K-FAC flavour <= {CRITERIA['steps_ratio_max']} x AdamW's median steps with "
         f"every seed reaching the target, and <= {CRITERIA['seconds_ratio_max']} x its median seconds (the paper "
         f"reports {PAPER_RANGE[0]:.2f}-{PAPER_RANGE[1]:.2f} in steps).", ""]
    if meta.get("reductions"):
        L += ["Reduced from the full protocol: " + meta["reductions"], ""]
    if meta.get("notes"):
        L += ["Reading: " + meta["notes"], ""]
    for name, rec in result["tasks"].items():
        L += _task_section(name, rec)
    return "\n".join(L)


def _task_section(name: str, rec: Dict[str, Any]) -> List[str]:
    b, t, s = rec["budget"], rec["target"], rec["summary"]
    L = [f"## {name}: {rec['description']}", "",
         f"Budget {b['steps']} steps, batch {b['batch_size']}, validation every {b['eval_every']} steps. "
         f"Target validation accuracy **{t['val_acc']:.4f}** = {t['rule']} ({t['base']:.4f}).", "",
         "Seconds two ways: *measured* (the runs' own training seconds; the machine's load varied between "
         "runs) and *interleaved* (median steps x seconds per step from a probe that alternates the optimisers "
         "in one process, factor and inverse updates amortised over their periods).", "",
         "| optimizer | steps to target (median) | per seed | steps ratio | reached | measured seconds | per seed | "
         "measured ratio | interleaved s/step | interleaved seconds ratio | measured s/step | best val acc (median) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for opt, m in s.items():
        L.append(f"| {opt} | {_num(m['steps'], '.0f', 'not reached')} | "
                 f"{', '.join(_num(v) for v in m['steps_per_seed'])} | {_times(m['steps_ratio'])} | "
                 f"{m['reached']:.2f} | {_num(m['seconds'], '.1f', '-')} | "
                 f"{', '.join(_num(v, '.1f') for v in m['seconds_per_seed'])} | {_times(m['seconds_ratio'])} | "
                 f"{1000 * m['modelled_sec_per_step']:.1f} ms | {_times(m['modelled_seconds_ratio'])} | "
                 f"{1000 * m['sec_per_step']:.1f} ms | {m['best_acc_median']:.4f} |")
    L += ["", "Chosen configurations:", ""]
    L += [f"- {opt}: {fmt_config(rec['final'][opt]['config'])}" for opt in rec["final"]]
    L += ["", "Benchmark criteria:", ""]
    for opt, c in rec["criteria"].items():
        verdict = "**met**" if c["met"] else "**missed**"
        L.append(f"- {opt}: {verdict} (every seed reaches the target: {_yes(c['all_seeds_reach'])}; steps ratio "
                 f"<= {CRITERIA['steps_ratio_max']}: {_yes(c['steps_ratio'])}; seconds ratio <= "
                 f"{CRITERIA['seconds_ratio_max']}, measured: {_yes(c['seconds_ratio'])}, interleaved: "
                 f"{_yes(c['modelled_seconds_ratio'])})")
    L += ["", "Sensitivity to the target rule (same final runs, configurations chosen for the main rule): median "
          "steps, steps ratio to AdamW / interleaved seconds ratio, fraction of seeds reaching it.", "",
          "| target (x base) | accuracy | " + " | ".join(s) + " |", "|---|---|" + "---|" * len(s)]
    for frac, row in rec["target_sensitivity"].items():
        cells = [f"{_num(row[o]['steps'])}, {_times(row[o]['steps_ratio'])} / {_times(row[o]['modelled_seconds_ratio'])} "
                 f"({row[o]['reached']:.1f})" for o in s]
        L.append(f"| {frac} | {row['target_val_acc']:.4f} | " + " | ".join(cells) + " |")
    L += _probe_section(rec) + [""] + _sweep_section(rec) + [""]
    return L


def _probe_section(rec: Dict[str, Any]) -> List[str]:
    probe = rec.get("schedule_probe")
    if not probe:
        return []
    s = probe["summary"]
    L = ["", f"### Diagnostic: the schedule compressed to {probe['frac']:g} of the budget ({probe['steps']} steps)", "",
         "The chosen configurations (not re-tuned) on the reported seeds with the warm-up + cosine schedule "
         f"ending at step {probe['steps']}; same target (`--from-json <this file> --schedule-probe {probe['frac']:g}`). "
         "Not part of the selection or the criteria.", "",
         "| optimizer | steps to target (median) | per seed | steps ratio | reached | interleaved seconds ratio | "
         "best val acc (median) |", "|---|---|---|---|---|---|---|"]
    for opt, m in s.items():
        best = statistics.median(max(c["acc"], default=0.0) for c in probe["final"][opt]["runs"])
        L.append(f"| {opt} | {_num(m['steps'], '.0f', 'not reached')} | "
                 f"{', '.join(_num(v) for v in m['steps_per_seed'])} | {_times(m['steps_ratio'])} | "
                 f"{m['reached']:.2f} | {_times(m['modelled_seconds_ratio'])} | {best:.4f} |")
    return L


def _times(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _sweep_section(rec: Dict[str, Any]) -> List[str]:
    L = ["### Tuning", "",
         "Coordinate search, stage by stage (objective: `acc` best accuracy, `steps` / `seconds` to the target; "
         "status `interior` = the choice has grid values on both sides, `natural end` = the axis cannot extend "
         "further):", "",
         "| optimizer | axis | objective | grid | chosen | status |", "|---|---|---|---|---|---|"]
    for opt, sw in rec["sweep"].items():
        for st in sw["stages"]:
            grid = ", ".join(fmt_value(v) for v in st["grid"])
            L.append(f"| {opt} | {st['axis']} | {st['objective']} | {grid} | {fmt_value(st['chosen'])} | "
                     f"{st['status']} |")
    L += ["", f"Sweep runs (seeds {rec['sweep']['adamw']['seeds']}; `target` = stopped at the target, `pruned` = "
          "stopped once it could no longer beat its stage's incumbent, x = target not reached):", "",
          "| optimizer | config | seed | steps to target | seconds to target | best acc | steps run | stopped |",
          "|---|---|---|---|---|---|---|---|"]
    for opt, sw in rec["sweep"].items():
        for r in sw["runs"]:
            L.append(f"| {opt} | {fmt_config(r['config'])} | {r['seed']} | {_num(r['steps_to_target'])} | "
                     f"{_num(r['seconds_to_target'], '.1f')} | {r['best_acc']:.4f} | {r['steps_run']} | "
                     f"{r['stopped']}{' diverged' if r['diverged'] else ''} |")
    return L


def render_figure(result: Dict[str, Any], path: Path) -> None:
    """Validation accuracy vs steps and vs training seconds of the final runs (from the JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"adamw": "tab:blue", "kfac_expand": "tab:red", "kfac_reduce": "tab:green"}
    tasks = result["tasks"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 8), squeeze=False)
    for j, (name, rec) in enumerate(tasks.items()):
        target = rec["target"]["val_acc"]
        for opt, fin in rec["final"].items():
            for i, c in enumerate(fin["runs"]):
                lab = opt if i == 0 else None
                axes[0, j].plot(c["steps"], c["acc"], color=colors[opt], alpha=0.6, lw=1.0, label=lab)
                axes[1, j].plot(c["seconds"], c["acc"], color=colors[opt], alpha=0.6, lw=1.0, label=lab)
            med = rec["summary"][opt]["steps"]
            if med is not None:
                axes[0, j].axvline(med, color=colors[opt], ls=":", lw=1.2)
        for i in range(2):
            ax = axes[i, j]
            ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target:.3f}")
            ax.set_ylim(max(0.0, target - 0.25), 1.0)
            ax.set_ylabel("validation accuracy")
            ax.grid(alpha=0.3)
        axes[0, j].set_title(f"{name}: validation accuracy ({len(result['meta']['seeds'])} seeds)")
        axes[0, j].set_xlabel("step (dotted: median steps to target)")
        axes[1, j].set_xlabel("training seconds (evaluation excluded)")
        axes[0, j].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


