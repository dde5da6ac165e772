#!/usr/bin/env python
"""WRN-16-4 (Fixup) marginal-likelihood tuning with learned augmentation, trained, at CPU scale.

The seed paper's Wide ResNet experiment (Eschenhagen et al. 2023; LILA, Immer et al. 2022) on an
offline task two CPU cores finish in a session: scikit-learn's 8x8 digits, every train and test
image rotated by a fixed random angle in [-90, 90] degrees; WRN-16-4 with Fixup, SGD with momentum
and cosine decay (the paper's optimiser), a layerwise prior and, in the augmentation arms, the
rotation range learned by the Laplace marginal likelihood. The protocol and why each choice was
made: :data:`PROTOCOL_NOTES` (also in the report).

Arms (``<approx>-<copies_approx>``: K-FAC flavour over the pixels, then over the S copies):

* learned rotation, ``expand-reduce`` (the literature's expand arm) and ``reduce-reduce``: three
  seeds each; ``expand-expand`` (the ablation): one seed;
* no augmentation, ``expand`` and ``reduce``: one seed each.

Every finished model is also scored under one common estimator (reduce-reduce K-FAC, the whole
training set, the augmentation noise fixed: :func:`common_estimate`), so that rows can be compared;
each arm's own reported value is its selection value (``hyper.selection``). Convergence of the
hyperparameters over the last three marglik updates, the wall time split into training and marglik,
and the seconds of one hyperstep per flavour measured in one process complete the report.

Writes ``results/wrn_marglik.{json,md,png}`` (markdown and figure rendered from the JSON alone; run
directories, repository-relative in the JSON, under ``--run-root``)::

    python scripts/run_wrn_marglik.py                  # the committed results (about 1.5 h on 2 cores)
    python scripts/run_wrn_marglik.py --quick --out /tmp/wrn --run-root /tmp/wrn/runs
    python scripts/run_wrn_marglik.py --from-json      # re-render md / png from the JSON
    python scripts/run_wrn_marglik.py --rerun aug-reduce-reduce-s1 --workers 1   # time one run again
    python scripts/run_wrn_marglik.py --rerun aug-expand-reduce-s2 --epochs 36 --workers 1   # lengthened

A run's duration is best read from ``--rerun`` on a machine without the study's other jobs; with
more ``--epochs`` a rerun tests whether the run's hyperparameters had converged (``wrn_reruns.py``).
Why the flavours learn different rotations: ``scripts/wrn_rotation_terms.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from wrn_protocol import ABLATIONS, DEFAULTS, LEAN_NOTES, PROTOCOL_NOTES, PROTOCOLS, job_config, protocol_of
from wrn_records import finish, fmt, learned_rotation, movement_bound
from wrn_reruns import lengthened_lines, rerun, rerun_lines

from benchlib import ROOT, flavour_label, hyperstep_timing_rows, time_hypersteps
from runner import read_json, run_pool, write_outputs

STEM = "wrn_marglik"  #: the study's outputs; ``--protocol lean`` writes ``wrn_marglik_lean``
QUICK_EPOCHS = 3  #: epochs of ``--quick``
_ORDER = {"expand-reduce": 0, "reduce-reduce": 1, "reduce[block2=expand]-reduce": 1.5, "reduce[type-2]-reduce": 1.6,
          "reduce[train-S]-reduce": 1.7, "expand-expand": 2, "expand (no copies)": 3, "reduce (no copies)": 4}

def stem_of(args: Any) -> str:
    """The outputs' file stem of a protocol (``args``: the namespace or the JSON's setup dict)."""
    proto = args.get("protocol", "study") if isinstance(args, dict) else getattr(args, "protocol", "study")
    return STEM if proto == "study" else f"{STEM}_{proto}"


# ------------------------------------------------------------------ jobs
def arm_name(aug: bool, approx: str, copies: str) -> str:
    """A run directory's name: a per-layer label ``reduce[block2=expand]`` becomes ``reduce_block2-expand``."""
    approx = approx.replace("[", "_").replace("=", "-").replace("]", "")
    return f"aug-{approx}-{copies}" if aug else f"none-{approx}"


def jobs_of(args) -> List[Dict[str, Any]]:
    jobs = []
    for aug, approx, copies, n_seeds in protocol_of(args)["arms"]:
        if not aug and copies == "expand":
            continue
        seeds = list(n_seeds) if isinstance(n_seeds, tuple) else list(range(n_seeds))
        for seed in (seeds if not args.quick else seeds[:1]):
            name = f"{arm_name(aug, approx, copies)}-s{seed}"
            jobs.append({"name": name, "arm": arm_name(aug, approx, copies), "augmentation": aug,
                         "approx": approx, "copies_approx": copies if aug else None, "seed": seed,
                         "cfg": job_config(args, aug, approx, copies, seed), "run_root": args.run_root,
                         "post": common_estimate})
    # longest first (expand-expand, expand-reduce, reduce-reduce, then no augmentation), so that two
    # workers finish together
    def rank(j: Dict[str, Any]) -> int:
        if not j["augmentation"]:
            return 3
        return 0 if j["copies_approx"] == "expand" else (1 if j["approx"] == "expand" else 2)

    jobs.sort(key=lambda j: (rank(j), j["seed"]))
    return jobs


def common_estimate(job: Dict[str, Any], tuner: Any, summary: Dict[str, Any]) -> Dict[str, Any]:
    """Score the reported model under one estimator shared by all arms: reduce-reduce K-FAC, the
    whole training set, one fixed draw of augmentation noise (the run's own learned range; none
    without augmentation), no gradient. Runs in the worker on the finished tuner (which holds the
    reported weights and hyperparameters)."""
    from marglik.tuning.estimator import SelectionSet

    cfg = tuner.cfg
    cfg.curvature.approx, cfg.curvature.copies_approx = "reduce", "reduce"
    cfg.hyper.selection = "full"
    tuner.selection = SelectionSet.from_config(cfg, tuner.N)
    t0 = time.perf_counter()
    value = float(tuner.selection_log_marglik())
    return {"common_log_marglik": value, "common_log_marglik_per_example": value / tuner.N,
            "common_seconds": time.perf_counter() - t0}


def mean_se(values: List[float]) -> Tuple[Optional[float], Optional[float]]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    m = statistics.fmean(vals)
    return m, (statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None)


def arm_table(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per arm: mean and standard error over seeds of every reported number."""
    out = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rs = [r for r in runs if r["arm"] == arm]
        row = {"arm": arm, "label": flavour_label(rs[0]), "augmentation": rs[0]["augmentation"], "seeds": len(rs)}
        for key, get in (
            ("test_accuracy", lambda r: r["summary"]["test_accuracy"]),
            ("test_nll", lambda r: r["summary"]["test_nll"]),
            ("own_log_marglik_per_example", lambda r: r["summary"]["log_marglik_per_example"]),
            ("common_log_marglik_per_example", lambda r: r.get("common_log_marglik_per_example")),
            ("rotation_deg", learned_rotation),
            ("rotation_movement_deg", lambda r: r["convergence"]["rotation_movement_deg"]),
            ("log_prior_movement", lambda r: r["convergence"]["log_prior_movement"]),
            ("train_seconds", lambda r: r["time_split"]["train_seconds"]),
            ("marglik_seconds", lambda r: r["time_split"]["marglik_seconds"]),
        ):
            row[key], row[key + "_se"] = mean_se([get(r) for r in rs])
        out.append(row)
    return sorted(out, key=lambda a: _ORDER.get(a["label"], 9))


def time_marglik_steps(args, repeats: int) -> Dict[str, Any]:
    """One marglik update's hypersteps per learned-augmentation flavour, in this process on the same
    WRN weights and data, flavours interleaved (:func:`benchlib.time_hypersteps`)."""
    import tempfile

    import torch

    from marglik.tuning import Config, MarglikTuner

    torch.set_num_threads(1)
    tuners, state = {}, None
    for aug, approx, copies, _ in protocol_of(args)["arms"]:
        if not aug or approx in ABLATIONS:
            continue
        cfg = Config.from_dict(job_config(args, True, approx, copies, 0), hyper={"selection_size": 8},
                               trainer={"resume": "never"}, logger={"mode": "disabled"})
        t = MarglikTuner(cfg, Path(tempfile.mkdtemp(prefix=f"wrn_timing_{approx}_{copies}_")))
        state = t.model.state_dict() if state is None else state
        t.model.load_state_dict(state)
        tuners[f"{approx}-{copies}"] = t
    return {**time_hypersteps(tuners, repeats, 45.0), "n_samples": args.n_samples,
            "marglik_batch_size": args.marglik_batch_size, "marglik_batches": args.marglik_batches,
            "steps": args.steps}


# ------------------------------------------------------------------ rendering (from the JSON alone)
def render(data: Dict[str, Any]) -> str:
    s = data["setup"]
    runs = [r for r in data["runs"] if "error" not in r]
    arms = arm_table(runs)
    lines = [
        "# WRN-16-4: marginal-likelihood tuning with learned augmentation, trained",
        "",
        f"Generated by `python scripts/run_wrn_marglik.py{' --quick' if s.get('quick') else ''}"
        f"{'' if s.get('protocol', 'study') == 'study' else ' --protocol ' + s['protocol']}` "
        f"({len(data['runs'])} runs, {s['workers']} runs at a time with one torch thread each on a 2-core CPU "
        "shared with other jobs; a run's seconds are its own, summed over the sittings of a resumed run).",
        "",
        f"Setting: scikit-learn digits (8x8, {s['train_size'] or 1437} train / 360 test), every image rotated by a "
        f"fixed random angle in [-{s['rotation']:g}, {s['rotation']:g}] degrees; WRN-16-4 with Fixup "
        f"({s.get('num_params', '2.7M')} parameters); SGD (momentum 0.9, lr {s['lr']:g}, cosine, batch "
        f"{s['batch_size']}, {s['epochs']} epochs); layerwise prior (initial precision {s['prior_prec_init']:g}) "
        f"tuned by the Laplace marginal likelihood (K-FAC GGN, {PROTOCOLS[s.get('protocol', 'study')]['fisher_type']}) after {s['burn_in']} burn-in epochs, "
        f"{s['steps']} hypersteps every {s['frequency']} epochs (Adam, lr {s['hyper_lr']:g} on the log prior "
        f"precisions, {s['aug_lr']:g} on eta), each on {s['marglik_batches']} random batches of "
        f"{s['marglik_batch_size']} images; learned range of the rotation generator with S = {s['n_samples']} "
        "copies (training, marglik and test predictions average the logits over the copies); the reported "
        f"model is the best selection value (a fixed subset of {s['selection_size']} training images).",
        "",
        PROTOCOL_NOTES,
        "",
        *([LEAN_NOTES, ""] if s.get("protocol") == "lean" else []),
        "## Results per arm (mean ± standard error over seeds)",
        "",
        "* own log marglik / N: each arm's selection value, under its own K-FAC flavour (not comparable "
        "between flavours); common: every reported model scored by one estimator (reduce-reduce K-FAC, the "
        "whole training set, fixed augmentation noise at the model's learned range).",
        "* convergence: over the last three marglik updates, the range of the learned rotation (degrees) and "
        "the summed largest change of a log prior precision; targets < 3 degrees and < 0.1 ('Every run' "
        "also gives the movement as a share of what Adam's decayed step allowed, 'Lengthened runs' a run with a "
        "longer schedule).",
        f"* learned rotation against the true {s['rotation']:g} degrees.",
        "",
        "| augmentation | K-FAC (pixels-copies) | seeds | test acc | test NLL | own log marglik / N | "
        "common log marglik / N | learned rotation (deg) | rotation moved (deg) | log prior moved | "
        "train s | marglik s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in arms:
        lines.append(
            f"| {'learned rotation' if a['augmentation'] else 'none'} | {a['label']} | {a['seeds']} | "
            f"{fmt(a['test_accuracy'], '.3f', a['test_accuracy_se'])} | {fmt(a['test_nll'], '.3f', a['test_nll_se'])} | "
            f"{fmt(a['own_log_marglik_per_example'], '.3f', a['own_log_marglik_per_example_se'])} | "
            f"{fmt(a['common_log_marglik_per_example'], '.3f', a['common_log_marglik_per_example_se'])} | "
            f"{fmt(a['rotation_deg'], '.1f', a['rotation_deg_se'])} | {fmt(a['rotation_movement_deg'], '.2f')} | "
            f"{fmt(a['log_prior_movement'], '.3f')} | {fmt(a['train_seconds'], '.0f')} | {fmt(a['marglik_seconds'], '.0f')} |")
    lines += timing_lines(data.get("step_timing"))
    lines += ["", "## Every run", "",
              "| run | test acc | test NLL | own log marglik / N | common log marglik / N | learned rotation | "
              "rotation moved | log prior moved | share of Adam's max | best epoch | train s | marglik s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(runs, key=lambda r: (_ORDER.get(flavour_label(r), 9), r["seed"])):
        sm, cv, ts = r["summary"], r["convergence"], r["time_split"]
        rot = learned_rotation(r)
        bound = movement_bound(r["history"], s["epochs"], s["burn_in"], s["hyper_lr"], s["steps"])
        lines.append(f"| {r['name']} | {sm['test_accuracy']:.3f} | {sm['test_nll']:.3f} | "
                     f"{fmt(sm['log_marglik_per_example'], '.3f')} | {fmt(r.get('common_log_marglik_per_example'), '.3f')} | "
                     f"{fmt(rot, '.1f')} | {fmt(cv['rotation_movement_deg'], '.2f')} | {fmt(cv['log_prior_movement'], '.3f')} | "
                     f"{fmt(cv['log_prior_movement'] and bound and cv['log_prior_movement'] / bound, '.2f')} | {sm['best_epoch']} | {ts['train_seconds']:.0f} | {ts['marglik_seconds']:.0f} |")
    bound = movement_bound(runs[0]["history"], s["epochs"], s["burn_in"], s["hyper_lr"], s["steps"]) if runs else None
    lines += ["", f"Share of Adam's max: the log prior movement over the most any precision could move in the last "
              f"three updates under the cosine-decayed hyper lr ({fmt(bound, '.3f')}: Adam's step is its lr; "
              "`movement_bound` in `scripts/wrn_records.py`). Near 1, a precision was still pushed one way at every "
              "hyperstep and the small movement is the schedule's; well below 1, the pushes had weakened or changed sign."]
    lines += rerun_lines(data.get("reruns"), {r["name"]: r for r in runs}, s.get("epochs"))
    lines += lengthened_lines(data.get("lengthened"), {r["name"]: r for r in runs}, s)
    failed = [r for r in data["runs"] if "error" in r]
    if failed:
        lines += ["", "Failed runs:", ""] + [f"* `{r['name']}`: {r['error']}" for r in failed]
    if data.get("reading"):
        lines += ["", "## Reading", "", data["reading"].strip()]
    lines += ["", f"![wrn marglik]({stem_of(s)}.png)", ""]
    return "\n".join(lines)


def timing_lines(timing: Optional[Dict[str, Any]]) -> List[str]:
    if not timing:
        return []
    return ["", "## Seconds per hyperstep, measured in one process", "",
            f"The hypersteps of one marglik update ({timing['steps']} hypersteps, each {timing['marglik_batches']} "
            f"batches of {timing['marglik_batch_size']} images with S = {timing['n_samples']} copies at a learned "
            f"range of {timing['rotation_deg']:g} degrees: augmentation, differentiable Laplace fit, log marglik, "
            "gradient w.r.t. the prior precisions and eta, optimizer step), the same WRN weights and data for every "
            f"flavour, flavours interleaved, {timing['repeats']} repeats, one thread:", ""] + \
        hyperstep_timing_rows(timing, _ORDER, digits=2)


def plot(data: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted([r for r in data["runs"] if "error" not in r], key=lambda r: (_ORDER.get(flavour_label(r), 9), r["seed"]))
    arms = arm_table(runs)
    colors = {a["label"]: f"C{i}" for i, a in enumerate(arms)}
    first: Dict[str, Dict[str, Any]] = {}
    for r in runs:  # the first run of an arm carries its legend entry (an arm may lack seed 0)
        first.setdefault(r["arm"], r)
    fig, axes = plt.subplots(1, 5, figsize=(23, 4))
    ax = axes[0]
    for r in runs:
        if r["augmentation"]:
            rot = r["history"].get("aug_rotation") or []
            ax.plot(range(1, len(rot) + 1), rot, color=colors[flavour_label(r)], alpha=0.8,
                    label=flavour_label(r) if r is first[r["arm"]] else None)
    ax.axhline(data["setup"]["rotation"], color="k", ls="--", lw=1, label="true range")
    ax.set(xlabel="epoch", ylabel="learned rotation (deg)", title="learned rotation range")
    ax.legend(fontsize=7)
    ax = axes[1]
    for r in runs:
        acc = r["history"].get("train_acc") or []
        ax.plot(range(1, len(acc) + 1), acc, color=colors[flavour_label(r)], ls="-" if r["augmentation"] else ":",
                alpha=0.8, label=flavour_label(r) if r is first[r["arm"]] else None)
    ax.set(xlabel="epoch", title="training accuracy")
    ax.legend(fontsize=7)
    ax = axes[2]
    for r in runs:
        prec = [math.log(v) for v in (r["history"].get("prior_prec_mean") or []) if v]
        ax.plot(range(1, len(prec) + 1), prec, color=colors[flavour_label(r)], ls="-" if r["augmentation"] else ":",
                alpha=0.8, label=flavour_label(r) if r is first[r["arm"]] else None)
    ax.set(xlabel="epoch", title="log of the mean prior precision")
    ax.legend(fontsize=7)
    for ax, key, title in ((axes[3], "test_accuracy", "test accuracy (± s.e.)"),
                           (axes[4], "common_log_marglik_per_example", "common log marglik / N (± s.e.)")):
        vals = [a[key] if a[key] is not None else float("nan") for a in arms]
        errs = [a[key + "_se"] or 0.0 for a in arms]
        ax.bar(range(len(arms)), vals, yerr=errs, color=[colors[a["label"]] for a in arms], capsize=3)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels([("aug\n" if a["augmentation"] else "none\n") + a["label"].replace("[", "\n[")
                            for a in arms], fontsize=6)
        ax.set_title(title)
        finite = [v for v in vals if v == v]
        if finite and key == "test_accuracy":
            ax.set_ylim(min(finite) - 0.05, min(1.0, max(finite) + 0.03))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ main
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rotation", type=float, default=DEFAULTS["rotation"])
    p.add_argument("--train-size", type=int, default=DEFAULTS["train_size"], help="None: all 1437 training digits")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="SGD lr (cosine to 1e-6)")
    p.add_argument("--n-samples", type=int, default=DEFAULTS["n_samples"], help="S augmented copies")
    p.add_argument("--burn-in", type=int, default=DEFAULTS["burn_in"])
    p.add_argument("--protocol", default="study", choices=sorted(PROTOCOLS),
                   help="study: the committed study (type-2 fits, training on the S copies); lean: issue #28's run "
                        "protocol (mc-root GGN, MAP on one copy, one hyperstep per epoch) with a per-layer arm; writes "
                        "wrn_marglik_lean.* (run directories: --run-root defaults to outputs/wrn_marglik_lean)")
    p.add_argument("--frequency", type=int, default=None, help="a marglik update every F epochs (protocol's default)")
    p.add_argument("--steps", type=int, default=None, help="hypersteps per marglik update (protocol's default)")
    p.add_argument("--prior-prec-init", type=float, default=DEFAULTS["prior_prec_init"])
    p.add_argument("--hyper-lr", type=float, default=DEFAULTS["hyper_lr"], help="Adam lr on the log prior precisions")
    p.add_argument("--aug-lr", type=float, default=DEFAULTS["aug_lr"], help="Adam lr on eta (radians)")
    p.add_argument("--marglik-batches", type=int, default=DEFAULTS["marglik_batches"])
    p.add_argument("--marglik-batch-size", type=int, default=DEFAULTS["marglik_batch_size"])
    p.add_argument("--selection-size", type=int, default=DEFAULTS["selection_size"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--wandb", default=DEFAULTS["wandb"], choices=["disabled", "offline", "online"])
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--run-root", default=None, help="default: outputs/<the outputs' stem>")
    p.add_argument("--quick", action="store_true", help="smoke test: 64 images, 3 epochs, one seed per arm")
    p.add_argument("--runs", nargs="+", default=None,
                   help="only these runs, in this order (names as in the report, e.g. aug-reduce-reduce-s0); the "
                        "runs already in <out>/wrn_marglik.json are kept, and an interrupted run resumes from its "
                        "last checkpoint under --run-root")
    p.add_argument("--reading", default=None, help="with --from-json: a text file with the honest reading of the "
                   "results, stored in the JSON and rendered under the tables")
    p.add_argument("--from-json", action="store_true", help="only re-render md / png from <out>/wrn_marglik.json")
    p.add_argument("--timing-repeats", type=int, default=3, help="in-process hyperstep timing repeats (0: skip)")
    p.add_argument("--timing-only", action="store_true", help="only the in-process timing, into the existing JSON")
    p.add_argument("--rerun", nargs="+", default=None,
                   help="run these runs again from scratch (under <run-root>/reruns, --workers at a time) to time "
                        "them on this machine; their records go to the JSON's 'reruns' beside the study's runs, "
                        "which stay as they are; with --epochs above the protocol's, lengthened runs (under "
                        "<run-root>/reruns/e<epochs>, records in 'lengthened')")
    args = p.parse_args(argv)
    proto = PROTOCOLS[args.protocol]
    args.frequency = proto["frequency"] if args.frequency is None else args.frequency
    args.steps = proto["steps"] if args.steps is None else args.steps
    args.run_root = args.run_root or str(ROOT / "outputs" / stem_of(args))
    args.protocol_epochs = QUICK_EPOCHS if args.quick else DEFAULTS["epochs"]
    if args.quick:  # --epochs above the default lengthens the quick protocol too (a --rerun smoke test)
        args.epochs = QUICK_EPOCHS + max(0, args.epochs - DEFAULTS["epochs"])
        args.train_size, args.burn_in, args.frequency = 64, 1, 1
        args.marglik_batch_size, args.selection_size, args.n_samples, args.timing_repeats = 8, 16, 2, 1
    known = [j["name"] for j in jobs_of(args)]
    for opt in ("runs", "rerun"):
        unknown = [n for n in getattr(args, opt) or [] if n not in known]
        if unknown:
            p.error(f"--{opt}: unknown run(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if args.rerun and args.epochs < args.protocol_epochs:
        p.error(f"--rerun: --epochs {args.epochs} is below the protocol's {args.protocol_epochs}; a rerun times "
                "the protocol's run or lengthens it")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    stem = stem_of(args)
    if args.from_json or args.timing_only:
        data = read_json(out, stem)
        if args.timing_only:
            data["step_timing"] = time_marglik_steps(args, args.timing_repeats)
        if args.reading:
            data["reading"] = Path(args.reading).read_text()
        write_outputs(out, stem, data, render, plot)
        return 0
    os.environ.setdefault("WANDB_SILENT", "true")
    jobs = jobs_of(args)
    if args.rerun:
        return rerun(args, jobs, out, stem, args.protocol_epochs, render, plot)
    kept: List[Dict[str, Any]] = []
    carried: Dict[str, Any] = {}  # the in-process hyperstep timing of an earlier sitting
    if args.runs:
        by_name = {j["name"]: j for j in jobs}  # names checked by parse()
        jobs = [by_name[n] for n in args.runs]
        if (out / f"{stem}.json").is_file():
            prev = read_json(out, stem)
            kept = [r for r in prev["runs"] if r["name"] not in args.runs]
            carried = {k: prev[k] for k in ("step_timing",) if k in prev}
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "run_root", "from_json", "timing_only", "runs",
                                                             "reading", "rerun", "protocol_epochs")}
    setup.update({"num_params": None, "test_size": 360, "device": "cpu", "torch_threads_per_run": 1})
    print(f"{len(jobs)} runs, {args.workers} at a time; run directories under {args.run_root}", flush=True)
    t0 = time.time()
    data: Dict[str, Any] = {"setup": setup, "runs": [], "wall_seconds": 0.0, **carried}

    def on_result(done: List[Dict[str, Any]]) -> None:
        data["runs"] = sorted(kept + [finish(r) for r in done], key=lambda r: r["name"])
        data["wall_seconds"] = time.time() - t0
        for r in done:
            if "summary" in r:
                setup["num_params"] = r["summary"]["num_params"]
        write_outputs(out, stem, data, render, plot)

    def describe(r: Dict[str, Any]) -> str:
        sm = r["summary"]
        rot = learned_rotation(r) or 0.0
        return (f"acc {sm['test_accuracy']:.3f} nll {sm['test_nll']:.3f} rot {rot:5.1f} deg "
                f"common lml/N {r.get('common_log_marglik_per_example', float('nan')):.3f} run {r['wall_seconds']:.0f} s")

    run_pool(jobs, args.workers, on_result, describe=describe)
    if args.timing_repeats > 0:
        print("timing one marglik update's hypersteps per flavour in this process ...", flush=True)
        data["step_timing"] = time_marglik_steps(args, args.timing_repeats)
        write_outputs(out, stem, data, render, plot)
    print(f"wrote {out / stem}.md/.json/.png in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
