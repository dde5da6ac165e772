"""Steps (and seconds) to a fixed validation target: AdamW vs K-FAC-expand vs K-FAC-reduce.

Tests, at CPU scale, the optimisation claim of Eschenhagen et al. (NeurIPS 2023): with K-FAC
preconditioning a graph network and a vision transformer reach a fixed validation target in
50-75% of the steps of a well-tuned first-order reference.

Tasks (offline, CPU):

* ``tvvit`` (the ViT of the study): torchvision's ``VisionTransformer``
  (:class:`marglik.models.TorchvisionViT`: 16x16 inputs, 4x4 patches -> 16 tokens + class token,
  width 64, 4 layers, 4 heads, MLP 128; every parameter preconditioned) on scikit-learn's digits
  upsampled to 16x16 under random affine warps (rotation +-20 deg, shifts +-15% of the side,
  log-scale +-0.1; fresh warps every step, :class:`marglik.augment.AffineAugmentation`). Validation:
  the 360 held-out digits under 4 fixed warps each (1440 images). AdamW needs about a thousand
  steps to the target.
* ``gnn``: :class:`marglik.models.GNN` (3 GIN-style layers, width 64, sum aggregation, mean
  readout) on the generated "hub edge" graph task of :func:`marglik.data.make_graph_dataset`
  (2000 training graphs, 500 validation graphs from another seed).
* ``vit``: :class:`marglik.models.ViT` on 8x8 digits (2x2 patches, width 64, 2 blocks); its
  positional embedding is updated by AdamW at AdamW's learning rate. Not in the default tasks.

Protocol (the same for every optimiser):

1. One schedule family: linear warm-up over a fraction ``warmup`` of the budget, then cosine decay
   to 0; a fixed step budget and batch size per task; the same batches and warps per seed for every
   optimiser. The schedule multiplies the learning rate and, for K-FAC, the KL clip by its square
   (while the clip binds it, not ``lr``, sets the step length ``sqrt(kl_clip / <u, g>)``). Validation accuracy every ``eval_every`` steps, not timed (training seconds exclude
   evaluation and batch preparation).
2. Each optimiser is tuned by a coordinate search on the sweep seeds (disjoint from the reported
   seeds): one axis at a time, the others held at the current choice; a choice on the edge of its
   grid widens the grid (up to ``--max-widen`` times per stage) until the choice is interior or
   the axis reaches its natural end (momentum 0, a period of 1 step, KL clipping off). Ties keep
   the current value.
3. AdamW first: learning rate by best validation accuracy (full runs). **Target** =
   ``--target-frac`` x the best mean (over sweep seeds) best validation accuracy of that sweep.
   Then learning rate, weight decay, warm-up and learning rate again, by mean steps to the target.
4. K-FAC (mc Fisher, pi-damping, factor EMA 0.95, no weight decay), per flavour: KL clip, learning
   rate, damping, momentum, warm-up by steps to the target; factor and inverse update periods by
   *seconds* to the target (their only purpose is cost; seconds = steps x a per-step cost measured
   by :func:`measure_costs`, robust to the machine's load); KL clip and learning rate again.
   Sweep runs stop at the target, and a run stops early once it can no longer beat the current
   choice of its stage (lossless for the choice: with ``n`` seeds a run can only win while its
   steps are below ``n x`` the incumbent's mean minus the other seeds' steps).
5. The chosen configurations run on seeds 1..``--seeds`` for the full budget. Reported per seed and
   as medians (a seed that never reaches the target counts as infinite): steps to the target, the
   training seconds measured in the runs and steps x the per-step cost of an interleaved probe of
   the three chosen configurations, ratios to AdamW, and the same for other target rules
   (0.95-0.99 x the AdamW base). Benchmark criteria: both K-FAC flavours <= 0.75 x AdamW's median
   steps with every seed reaching the target, and <= 1.0 x its median seconds.

Wall-clock numbers come from a shared CPU with one torch thread and are noisy.

Runs: ``--tasks gnn`` (default) -> ``results/optimizer_steps_to_target``; ``--tasks tvvit --out-name
optimizer_steps_to_target_tvvit --sweep-seeds 1`` (the CPU-budget reduction; run times in the
reports' headers). Writes ``results/<--out-name>.{json,md,png}``; the markdown and the figure are
rendered from the JSON alone (``--from-json FILE`` re-renders them; with ``--schedule-probe FRAC``
it first adds the chosen configurations' runs under a schedule compressed to ``FRAC`` of the
budget, a diagnostic; ``--notes`` sets the report's reading). ``--quick`` is a smoke test (seconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchlib import ROOT
from optbench_report import (  # noqa: F401  (the report's names, re-exported)
    CRITERIA,
    OPTIMIZERS,
    PAPER_RANGE,
    SENSITIVITY_FRACS,
    fmt_config,
    fmt_value,
    outcome,
    render_figure,
    render_markdown,
    summarise,
)
from optbench_search import ADAMW_STAGES, KFAC_STAGES, Axis, Search, adamw_space, kfac_space
from optbench_tasks import MAKERS, Task
from optbench_train import Budget, RunResult, measure_costs, step_cost, train_run
from runner import portable_argv, repo_path, write_outputs

SWEEP_SEEDS = (100, 101, 102)
SCHEMA = "optimizer_steps_to_target/2"


# ----------------------------------------------------------------------------------------- protocol
def tune(task: Task, opt: str, budget: Budget, args, target: List[Optional[float]], fixed: Dict[str, Any],
         log: Callable[[str], None], adamw: Optional[Dict[str, Any]] = None) -> Tuple[Dict[str, Any], Search]:
    """Coordinate search of one optimiser; sets ``target[0]`` after AdamW's accuracy stage. K-FAC
    (``adamw`` = AdamW's chosen configuration) first measures its step costs interleaved with AdamW's,
    for the seconds objective of its update periods (``search.costs``)."""
    start, axes = adamw_space(task.name) if opt == "adamw" else kfac_space(task.name)
    stages = ADAMW_STAGES if opt == "adamw" else KFAC_STAGES
    if args.quick:
        axes = {k: Axis(k, [start[k]], a.transform, a.lo, a.hi, a.integer) for k, a in axes.items()}
        stages = stages[:2]
    current = dict(start, **fixed)
    costs = measure_costs(task, {"adamw": adamw, opt: current}, budget) if adamw is not None else None

    def run(config, seed, **kw):
        return train_run(task, opt, config, seed, budget, **kw)

    search = Search(run, SWEEP_SEEDS[: args.sweep_seeds], target, args.max_widen, log,
                    cost=(lambda cfg: step_cost(costs, opt, cfg)) if costs else None)
    search.costs = costs
    for name, objective in stages:
        log(f"{task.name} {opt}: stage {name} ({objective}) at {fmt_config(current)}")
        current = search.stage(current, axes[name], objective)
        if objective == "acc":
            target[0] = set_target(search, args.target_frac)
            log(f"{task.name}: target {target[0]:.4f}")
    return current, search


def set_target(search: Search, frac: float) -> float:
    """``frac`` x the best mean (over the sweep seeds) best accuracy of the runs so far."""
    by_config: Dict[str, List[float]] = {}
    for (k, _), r in search.cache.items():
        by_config.setdefault(k, []).append(r.best_acc)
    base = max(statistics.fmean(v) for v in by_config.values())
    search.target_base = base
    return frac * base


def final_runs(task: Task, opt: str, config: Dict[str, Any], budget: Budget, seeds: Sequence[int],
               log: Callable[[str], None]) -> List[RunResult]:
    """The chosen configuration on the reported seeds, full budget."""
    runs = []
    for s in seeds:
        r = train_run(task, opt, config, s, budget)
        log(f"  final {task.name} {opt} seed {s}: best {r.best_acc:.4f} {r.step_seconds:.1f}s "
            f"({1000 * r.sec_per_step:.1f} ms/step)")
        runs.append(r)
    return runs


def _curve(r: RunResult) -> Dict[str, Any]:
    return {"seed": r.seed, "steps": r.steps, "acc": [round(a, 5) for a in r.acc],
            "seconds": [round(t, 3) for t in r.seconds], "sec_per_step": r.sec_per_step, "diverged": r.diverged}


def run_task(name: str, args, log: Callable[[str], None]) -> Dict[str, Any]:
    """The whole protocol of one task; returns its JSON record."""
    task = MAKERS[name]()
    budget = task_budget(name, args)
    target: List[Optional[float]] = [None]
    chosen, searches = {}, {}
    t0 = time.time()
    chosen["adamw"], searches["adamw"] = tune(task, "adamw", budget, args, target, {}, log)
    fixed = {"fallback_lr": chosen["adamw"]["lr"]} if name == "vit" else {}
    for opt in OPTIMIZERS[1:]:
        chosen[opt], searches[opt] = tune(task, opt, budget, args, target, fixed, log, adamw=chosen["adamw"])
    sweep_seconds = time.time() - t0
    final = {opt: final_runs(task, opt, chosen[opt], budget, range(1, args.seeds + 1), log) for opt in OPTIMIZERS}
    costs = measure_costs(task, chosen, budget)
    log(f"{name}: interleaved step costs {costs}")
    rec = {
        "description": task.description, "budget": asdict(budget),
        "target": {"val_acc": target[0], "base": searches["adamw"].target_base, "frac": args.target_frac,
                   "rule": f"{args.target_frac} x the best mean (over sweep seeds) best validation accuracy of "
                           "AdamW's learning-rate sweep"},
        "sweep": {opt: {"seeds": searches[opt].seeds, "stages": searches[opt].stages, "chosen": chosen[opt],
                        "step_costs": searches[opt].costs, "runs": searches[opt].records()}
                  for opt in OPTIMIZERS},
        "final": {opt: {"config": chosen[opt], "runs": [_curve(r) for r in final[opt]],
                        "step_costs": costs[opt], "modelled_sec_per_step": step_cost(costs, opt, chosen[opt])}
                  for opt in OPTIMIZERS},
        "seconds": {"sweep": round(sweep_seconds, 1), "final": round(time.time() - t0 - sweep_seconds, 1)},
    }
    if args.raw:  # the runs, before anything can fail in the summary
        Path(args.raw).write_text(json.dumps(rec))
    rec.update(summarise(rec))
    return rec


def task_budget(name: str, args) -> Budget:
    """Step budget, evaluation period and batch size of a task (``--steps`` etc. override)."""
    d = {"tvvit": Budget(2000, 50, 128), "gnn": Budget(2000, 20, 64), "vit": Budget(600, 5, 64)}[name]
    if args.quick:
        d = Budget(12, 4, 16)
    return Budget(args.steps or d.steps, args.eval_every or d.eval_every, args.batch_size or d.batch_size)


def schedule_probe(name: str, rec: Dict[str, Any], frac: float, log: Callable[[str], None]) -> Dict[str, Any]:
    """Diagnostic, not part of the selection: the chosen configurations again on the reported seeds
    with the whole schedule (warm-up + cosine) compressed to ``frac`` of the budget. Shows whether an
    early lead turns into fewer steps to the target once the schedule anneals sooner."""
    task = MAKERS[name]()
    b = Budget(**rec["budget"])
    short = Budget(round(frac * b.steps), b.eval_every, b.batch_size)
    final = {}
    for opt, fin in rec["final"].items():
        seeds = [c["seed"] for c in fin["runs"]]
        runs = final_runs(task, opt, fin["config"], short, seeds, log)
        final[opt] = {"runs": [_curve(r) for r in runs], "modelled_sec_per_step": fin["modelled_sec_per_step"]}
    return {"frac": frac, "steps": short.steps, "final": final,
            "summary": outcome(final, rec["target"]["val_acc"])}


def render(result: Dict[str, Any], out: Path, stem: str) -> None:
    """Write JSON, markdown and figure (the markdown is printed too)."""
    write_outputs(out, stem, result, render_markdown, render_figure, indent=2, end="")
    print((Path(out) / f"{stem}.md").read_text())


# ----------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["gnn"], choices=list(MAKERS))
    p.add_argument("--out-name", default="optimizer_steps_to_target", help="base name of the result files")
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--steps", type=int, default=None, help="step budget (default: per task)")
    p.add_argument("--eval-every", type=int, default=None, help="default: per task")
    p.add_argument("--batch-size", type=int, default=None, help="default: per task")
    p.add_argument("--seeds", type=int, default=5, help="reported seeds 1..S")
    p.add_argument("--sweep-seeds", type=int, default=2, choices=[1, 2, 3], help="seeds per sweep configuration")
    p.add_argument("--target-frac", type=float, default=0.98)
    p.add_argument("--max-widen", type=int, default=3, help="grid extensions per search stage")
    p.add_argument("--reductions", default="", help="what was reduced from the full protocol (goes in the report)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings on a shared CPU)")
    p.add_argument("--raw", default=None, help="also dump each task's runs (before summarising) to this file")
    p.add_argument("--schedule-probe", type=float, default=None,
                   help="with --from-json: add the chosen configurations' runs under a schedule of this fraction "
                        "of the budget (a diagnostic)")
    p.add_argument("--notes", default=None, help="with --from-json: set the report's reading paragraph")
    p.add_argument("--from-json", default=None, help="only re-render the markdown and figure of this result JSON")
    p.add_argument("--quick", action="store_true", help="smoke test: a few steps, 1 seed, one-point grids")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.sweep_seeds = 1, 1
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the protocol (or re-render with ``--from-json``); returns the result JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.from_json:
        path = Path(args.from_json)
        result = json.loads(path.read_text())
        result["meta"]["argv"] = portable_argv(result["meta"]["argv"])
        if args.notes is not None:
            result["meta"]["notes"] = args.notes
        if args.schedule_probe:
            for name, rec in result["tasks"].items():
                rec["schedule_probe"] = schedule_probe(name, rec, args.schedule_probe, print)
        render(result, path.parent, path.stem)
        return result
    out = Path(args.out)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.time()
    tasks = {name: run_task(name, args, log) for name in args.tasks}
    result = {
        "schema": SCHEMA, "tasks": tasks,
        "meta": {"script": "scripts/bench_optimizer.py", "argv": portable_argv(argv if argv is not None else sys.argv[1:]),
                 "json": repo_path(out / f"{args.out_name}.json"), "figure": repo_path(out / f"{args.out_name}.png"),
                 "seeds": list(range(1, args.seeds + 1)), "sweep_seeds": list(SWEEP_SEEDS[: args.sweep_seeds]),
                 "torch_threads": torch.get_num_threads(), "total_seconds": round(time.time() - t0, 1),
                 "paper_steps_ratio_range": PAPER_RANGE, "criteria": CRITERIA, "reductions": args.reductions},
    }
    render(result, out, args.out_name)
    return result


if __name__ == "__main__":
    main()
