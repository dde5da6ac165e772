"""Runs of the WRN-16-4 study again (a library module of ``scripts/``, no entry point): ``--rerun``
of ``run_wrn_marglik.py`` and the report sections of what it records.

Two kinds of rerun, told apart by ``--epochs``:

* **timing** (the protocol's epochs): the run from scratch on a machine without the study's other
  jobs, to read its duration against the 20-minute budget, and the run-to-run spread of one seed
  (torch on a CPU is not bit-reproducible across processes). Records go to ``data["reruns"]``.
* **lengthened** (more epochs): the same run with a longer schedule, which the issue prescribes when a
  run's hyperparameters still move over its last three updates. Under the cosine schedules a longer
  run's last updates are bounded by a smaller Adam step, so its movement passes the target almost by
  construction; what it tests is whether the *answer* changes: the learned rotation and every final
  log prior precision against the study run's. Records go to ``data["lengthened"]``.

Each finished record is merged into the JSON as it is on disk at that moment (re-read, not the copy
read at start), so reruns started as separate processes do not overwrite each other's records.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from wrn_records import finish, fmt, learned_rotation, movement_bound

from runner import read_json, run_pool, write_outputs


def rerun(args, jobs: List[Dict[str, Any]], out: Path, stem: str, protocol_epochs: int,
          render: Callable[[Dict[str, Any]], str], plot: Callable[[Dict[str, Any], Path], None]) -> int:
    """``--rerun``: the named runs again from scratch, ``--workers`` at a time, nothing else started.

    Records (the study's fields plus ``context``: workers, cores, the 1-minute load average before and
    after, the epochs) replace earlier records of the same names under ``"reruns"`` (``args.epochs ==
    protocol_epochs``) or ``"lengthened"`` (more epochs) of the JSON; other names are kept and the
    study's runs are untouched. Run directories: ``<run-root>/reruns/<name>`` or
    ``<run-root>/reruns/e<epochs>/<name>``, removed first (a kept checkpoint would be resumed)."""
    by_name = {j["name"]: j for j in jobs}  # names and epochs checked by run_wrn_marglik.parse()
    key = "reruns" if args.epochs == protocol_epochs else "lengthened"
    root = Path(args.run_root) / "reruns"
    if key == "lengthened":
        root = root / f"e{args.epochs}"
    read_json(out, stem)  # the study's JSON must exist before hours of runs are spent
    todo = []
    for name in args.rerun:
        shutil.rmtree(root / name, ignore_errors=True)
        todo.append({**by_name[name], "run_root": str(root)})
    context = {"workers": args.workers, "cpu_count": os.cpu_count(), "epochs": args.epochs,
               "load_average_1min_before": os.getloadavg()[0]}
    print(f"rerunning {', '.join(args.rerun)} ({args.epochs} epochs), {args.workers} at a time, under {root}",
          flush=True)

    def on_result(done: List[Dict[str, Any]]) -> None:
        data = read_json(out, stem)
        for r in done:
            r.setdefault("context", {**context, "load_average_1min_after": os.getloadavg()[0]})
        earlier = [r for r in (data.get(key) or {}).get("runs", []) if r["name"] not in args.rerun]
        data[key] = {"runs": sorted(earlier + [finish(r) for r in done], key=lambda r: r["name"])}
        write_outputs(out, stem, data, render, plot)

    run_pool(todo, args.workers, on_result)
    return 0


def succeeded(records: List[Dict[str, Any]], lines: List[str], columns: int) -> Iterator[Dict[str, Any]]:
    """The records that finished; a failed one becomes a table row of ``columns`` cells in ``lines``
    (listed, not dropped)."""
    for r in records:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |" + "|" * (columns - 2))
        else:
            yield r


def rerun_lines(reruns: Optional[Dict[str, Any]], study: Dict[str, Dict[str, Any]], epochs: Any) -> List[str]:
    """The timing reruns' section: each rerun's own seconds (training, marglik updates, the common
    estimate after the run) beside the study run of the same name."""
    if not reruns:
        return []
    lines = ["", "## Reruns: one run's time on a machine without the study's other jobs", "",
             f"`python scripts/run_wrn_marglik.py --rerun <run> ...`: runs from scratch, one torch thread each, "
             f"with the number of runs at a time and the 1-minute load average before and after (a load of 2 on 2 "
             f"cores: one other single-thread job beside the run, the study's setting). Run minutes = training + "
             f"marglik updates ({epochs} epochs); the common estimate is scored after the run and listed apart. "
             "The study's numbers of the same run in parentheses (CPU float arithmetic is not bit-reproducible "
             "across processes, so a rerun also shows the run-to-run spread of one seed).", "",
             "| run | at a time | load before / after | run min | train s | marglik s | common estimate s | test acc | "
             "learned rotation (deg) | rotation moved | log prior moved |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in succeeded(reruns["runs"], lines, columns=11):
        ts, sm, cv = r["time_split"], r["summary"], r["convergence"]
        o = study.get(r["name"])

        def both(v: Optional[float], ov: Optional[float], spec: str) -> str:
            return fmt(v, spec) + (f" ({fmt(ov, spec)})" if o is not None else "")

        c = r.get("context") or {}
        lines.append(
            f"| {r['name']} | {c.get('workers', '-')} | {fmt(c.get('load_average_1min_before'), '.1f')} / "
            f"{fmt(c.get('load_average_1min_after'), '.1f')} | {run_minutes(r):.1f} | "
            f"{ts['train_seconds']:.0f} | "
            f"{ts['marglik_seconds']:.0f} | {fmt(r.get('common_seconds'), '.0f')} | "
            f"{both(sm['test_accuracy'], o and o['summary']['test_accuracy'], '.3f')} | {both(learned_rotation(r), learned_rotation(o), '.1f')} | "
            f"{both(cv['rotation_movement_deg'], o and o['convergence']['rotation_movement_deg'], '.2f')} | "
            f"{both(cv['log_prior_movement'], o and o['convergence']['log_prior_movement'], '.3f')} |")
    notes = [f"* {r['name']}: {r['context']['note']}" for r in reruns["runs"] if (r.get("context") or {}).get("note")]
    return lines + ([""] + notes if notes else [])


def run_minutes(rec: Dict[str, Any]) -> float:
    """Training plus marglik updates of a record, in minutes."""
    ts = rec["time_split"]
    return (ts["train_seconds"] + ts["marglik_seconds"]) / 60


def is_fixup_scalar(name: str) -> bool:
    """Whether a parameter of the Fixup WRN is one of its scalar biases or scales (``bias1``,
    ``block1.0.bias2b``, ``block1.0.scale``, ...: one element each, whose prior precision the marginal
    likelihood determines only loosely), by its module name."""
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return module.startswith("bias") or module == "scale"


def precision_shift(rec: Dict[str, Any], ref: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """``|log delta - log delta_ref|`` per parameter tensor between two records' reported prior
    precisions, for the weight tensors (convolutions, shortcuts, classifier) and the Fixup scalars
    apart: per group the largest (and its tensor) and the median; ``None`` without common tensors."""
    a, b = rec["summary"].get("prior_precision_by_name") or {}, ref["summary"].get("prior_precision_by_name") or {}
    diff = {k: abs(math.log(a[k]) - math.log(b[k])) for k in a if k in b}
    if not diff:
        return None
    out: Dict[str, Any] = {}
    for group, keep in (("weights", lambda k: not is_fixup_scalar(k)), ("scalars", is_fixup_scalar)):
        d = {k: v for k, v in diff.items() if keep(k)}
        worst = max(d, key=d.get) if d else None
        out[group] = None if not d else {"max": d[worst], "max_tensor": worst, "median": statistics.median(d.values()),
                                         "tensors": len(d)}
    return out


def lengthened_lines(lengthened: Optional[Dict[str, Any]], study: Dict[str, Dict[str, Any]],
                     setup: Dict[str, Any]) -> List[str]:
    """The lengthened reruns' section: the movement over the last three updates against Adam's bound,
    and how far the answer (rotation, every log prior precision) moved from the study run's."""
    if not lengthened:
        return []
    lines = ["", "## Lengthened runs: does the answer change with a longer schedule?", "",
             "`python scripts/run_wrn_marglik.py --rerun <run> --epochs E`: the same run (seed, protocol) with E "
             f"epochs instead of {setup['epochs']}: more marglik updates, and every cosine schedule stretched. Its "
             "last three updates are bounded by a smaller Adam step (column 'Adam's max': the most a log prior "
             "precision could move, a movement at it means a precision was still pushed one way at every "
             "hyperstep), so the movement target alone proves little; the test is whether the learned answer "
             "changes against the study run (in parentheses): rotation, test accuracy and the reported log prior "
             "precisions, tensor by tensor.", "",
             "| run | epochs | updates | run min | test acc | learned rotation (deg) | rotation moved | "
             "log prior moved | Adam's max | moved most in the last updates | \\|Δ log prior\\| vs study, weight "
             "tensors: largest / median | the same, Fixup scalars | seed spread, weight tensors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|"]
    for r in succeeded(lengthened["runs"], lines, columns=13):
        o, cv, sm = study.get(r["name"]), r["convergence"], r["summary"]
        ep = (r.get("context") or {}).get("epochs", sm.get("epochs"))
        bound = movement_bound(r["history"], ep, setup["burn_in"], setup["hyper_lr"], setup["steps"])
        shift = precision_shift(r, o) if o is not None else None  # None: no common tensors
        movers = ", ".join(dict.fromkeys(m for m in cv.get("log_prior_movers", []) if m)) or "-"
        updates = sum(v is not None for v in r["history"].get("log_marglik") or [])
        lines.append(
            f"| {r['name']} | {ep} | {updates} | {run_minutes(r):.1f} | "
            f"{fmt(sm['test_accuracy'], '.3f')} ({fmt(o and o['summary']['test_accuracy'], '.3f')}) | "
            f"{fmt(learned_rotation(r), '.1f')} ({fmt(learned_rotation(o), '.1f')}) | "
            f"{fmt(cv['rotation_movement_deg'], '.2f')} | {fmt(cv['log_prior_movement'], '.3f')} | "
            f"{fmt(bound, '.3f')} | {movers} | {shift_cell(shift, 'weights')} | {shift_cell(shift, 'scalars')} | "
            f"{fmt(seed_range([x for x in study.values() if o is not None and x.get('arm') == o.get('arm')]), '.3f')} |")
    return lines + ["", "Weight tensors: the convolutions, shortcuts and the classifier; Fixup scalars: the one-element "
                    "biases and scales of the residual branches, whose precision one parameter's worth of evidence "
                    "pins down only loosely; seed spread: the median over the weight tensors of the range of log "
                    "prior precision across the study's seeds of the same arm."]


def seed_range(runs: List[Dict[str, Any]]) -> Optional[float]:
    """Median over the weight tensors of the range of ``log delta`` across the given runs (an arm's
    seeds): the spread a shift is measured against; ``None`` below two runs."""
    precs = [r["summary"].get("prior_precision_by_name") or {} for r in runs]
    if len(precs) < 2:
        return None
    names = [k for k in precs[0] if not is_fixup_scalar(k) and all(k in p for p in precs)]
    ranges = [max(math.log(p[k]) for p in precs) - min(math.log(p[k]) for p in precs) for k in names]
    return statistics.median(ranges) if ranges else None


def shift_cell(shift: Optional[Dict[str, Any]], group: str) -> str:
    g = (shift or {}).get(group)
    return "-" if not g else f"{g['max']:.3f} ({g['max_tensor']}) / {g['median']:.3f} ({g['tensors']} tensors)"
