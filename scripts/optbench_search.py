"""The coordinate search of ``bench_optimizer.py`` (a library module: no entry point): the axes
and their widening, the search spaces and stages of AdamW and K-FAC, and :class:`Search` with
cached, losslessly pruned sweep runs."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from optbench_report import _finite, fmt_config
from optbench_train import RunResult


# ----------------------------------------------------------------------------------------- search spaces
@dataclass
class Axis:
    """One hyperparameter of a coordinate search.

    ``grid`` is sorted; ``None`` (only for ``kl_clip``: clipping off) sorts last. Widening steps
    geometrically in ``value`` (``transform="log"``) or in ``1 - value`` (``"one_minus"``:
    momentum); ``lo`` / ``hi`` are the natural ends (a widened value past one is clamped to it,
    and an axis whose edge value is its natural end cannot widen further).
    """

    name: str
    grid: List[Any]
    transform: str = "log"
    lo: Optional[float] = None
    hi: Optional[float] = None
    integer: bool = False

    def numeric(self) -> List[float]:
        return [v for v in self.grid if v is not None]

    def widen(self, side: str) -> Optional[Any]:
        """The next value beyond the ``"low"`` / ``"high"`` end, or ``None`` at a natural end."""
        vals = self.numeric()
        if side == "high" and None in self.grid:
            return None
        if len(vals) < 2:
            return None
        if self.transform == "one_minus":
            u = [1.0 - v for v in vals]  # decreasing in value
            a, b = (u[0], u[1]) if side == "low" else (u[-1], u[-2])
            new = 1.0 - a * a / b
        else:
            a, b = (vals[0], vals[1]) if side == "low" else (vals[-1], vals[-2])
            new = a * a / b
        if self.integer:
            new = round(new)
        if self.lo is not None and new <= self.lo:
            new = self.lo
        if self.hi is not None and new >= self.hi:
            new = self.hi
        new = int(new) if self.integer else float(f"{new:.3g}")
        return None if new in vals else new

    def insert(self, value: Any) -> None:
        self.grid = sorted(self.numeric() + [value]) + ([None] if None in self.grid else [])

    def edge(self, value: Any) -> Optional[str]:
        """``"low"`` / ``"high"`` if ``value`` is on that end of the grid, else ``None``."""
        if len(self.grid) < 2:
            return None
        if value == self.grid[0]:
            return "low"
        if value == self.grid[-1]:
            return "high"
        return None

    def status(self, value: Any) -> str:
        """``interior``, ``natural end`` or ``edge`` (widening stopped by the limit)."""
        side = self.edge(value)
        if side is None:
            return "interior" if len(self.grid) > 1 else "fixed"
        return "natural end" if self.widen(side) is None else "edge"


def adamw_space(task: str) -> Tuple[Dict[str, Any], Dict[str, Axis]]:
    """AdamW's start configuration and axes."""
    lrs = {"gnn": [1e-2, 2e-2, 4e-2, 8e-2], "vit": [5e-4, 1e-3, 2e-3, 4e-3]}.get(task, [5e-4, 1e-3, 2e-3, 4e-3])
    start = {"lr": lrs[1], "weight_decay": 0.05, "warmup": 0.05}
    axes = {
        "lr": Axis("lr", lrs),
        "weight_decay": Axis("weight_decay", [0.01, 0.05, 0.25]),
        "warmup": Axis("warmup", [0.025, 0.05, 0.1], lo=0.0025, hi=0.5),
    }
    return start, axes


def kfac_space(task: str) -> Tuple[Dict[str, Any], Dict[str, Axis]]:
    """K-FAC's start configuration and axes (shared by both flavours)."""
    start = {"lr": 0.1, "damping": 1e-3, "kl_clip": 1e-4, "momentum": 0.9, "warmup": 0.05,
             "factor_update_every": 10, "inverse_update_every": 10}
    axes = {
        "lr": Axis("lr", [0.03, 0.1, 0.3]),
        "damping": Axis("damping", [3e-4, 1e-3, 3e-3]),
        "kl_clip": Axis("kl_clip", [1e-5, 1e-4, 1e-3, None]),
        "momentum": Axis("momentum", [0.8, 0.9, 0.95], transform="one_minus", lo=0.0, hi=0.99),
        "warmup": Axis("warmup", [0.025, 0.05, 0.1], lo=0.0025, hi=0.5),
        "factor_update_every": Axis("factor_update_every", [10, 30, 100], lo=1, integer=True),
        "inverse_update_every": Axis("inverse_update_every", [10, 30, 100], lo=1, integer=True),
    }
    return start, axes


# objective per stage: "acc" (maximise best accuracy; AdamW's first stage, before a target exists),
# "steps" or "seconds" to the target
ADAMW_STAGES = [("lr", "acc"), ("lr", "steps"), ("weight_decay", "steps"), ("warmup", "steps"), ("lr", "steps")]
KFAC_STAGES = [("kl_clip", "steps"), ("lr", "steps"), ("damping", "steps"), ("momentum", "steps"),
               ("warmup", "steps"), ("factor_update_every", "seconds"), ("inverse_update_every", "seconds"),
               ("kl_clip", "steps"), ("lr", "steps")]


# ----------------------------------------------------------------------------------------- search
def _key(config: Dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


class Search:
    """Coordinate search of one optimiser with cached, pruned sweep runs.

    Args:
        run: ``run(config, seed, stop_at, max_steps, max_seconds) -> RunResult``.
        seeds: sweep seeds.
        target: a one-element list holding the target accuracy (``None`` before it is known).
        max_widen: widening steps per stage.
        log: called with one line per run.
        cost: seconds per step of a configuration (:func:`step_cost`); the ``"seconds"`` objective
            is then steps to the target x this cost (robust to the load of a shared machine),
            else the run's measured training seconds.
    """

    def __init__(self, run: Callable[..., RunResult], seeds: Sequence[int], target: List[Optional[float]],
                 max_widen: int = 3, log: Callable[[str], None] = print,
                 cost: Optional[Callable[[Dict[str, Any]], float]] = None) -> None:
        self.run, self.seeds, self.target, self.max_widen, self.log = run, list(seeds), target, max_widen, log
        self.cost = cost
        self.costs: Optional[Dict[str, Dict[str, float]]] = None  # the measurements behind ``cost``
        self.cache: Dict[Tuple[str, int], RunResult] = {}
        self.stages: List[Dict[str, Any]] = []
        self.target_base: Optional[float] = None  # set by set_target

    # ---- scores (lower is better)
    def _metric(self, r: RunResult, objective: str) -> float:
        if objective == "acc":
            return -r.best_acc
        t = self.target[0]
        if t is None:
            return math.inf
        if objective == "steps":
            return r.steps_to(t)
        return r.steps_to(t) * self.cost(r.config) if self.cost else r.seconds_to(t)

    def _limits(self, config: Dict[str, Any], objective: str, left: float) -> Dict[str, float]:
        if objective == "seconds" and self.cost is None:
            return {"max_seconds": left}
        return {"max_steps": left / (self.cost(config) if objective == "seconds" else 1.0)}

    def score(self, config: Dict[str, Any], objective: str) -> Tuple[float, ...]:
        """Mean objective over the sweep seeds (``inf`` if a seed missed the target, was pruned or
        did not run); the seconds objective breaks ties by steps. A stage keeps its current value
        on ties (a challenger must score strictly lower)."""
        runs = [self.cache.get((_key(config), s)) for s in self.seeds]
        if any(r is None for r in runs):
            return (math.inf, math.inf)
        mean = statistics.fmean(self._metric(r, objective) for r in runs)
        if objective != "seconds":
            return (mean,)
        return (mean, statistics.fmean(self._metric(r, "steps") for r in runs))

    # ---- evaluation with pruning
    def evaluate(self, config: Dict[str, Any], objective: str, bound: float = math.inf) -> Tuple[float, ...]:
        """Run the sweep seeds of ``config`` (cached), pruning against ``bound`` = the incumbent's
        mean objective; a seed that misses the target skips the remaining seeds."""
        done = 0.0
        for i, seed in enumerate(self.seeds):
            k = (_key(config), seed)
            if k not in self.cache:
                left = len(self.seeds) * bound - done if objective != "acc" and math.isfinite(bound) else math.inf
                if left <= 0:  # it can at best tie with the incumbent, which then stays
                    break
                limits = self._limits(config, objective, left)
                stop_at = self.target[0] if objective != "acc" else None
                r = self.run(config, seed, stop_at=stop_at, **limits)
                self.cache[k] = r
                self.log(f"  {fmt_config(config)} seed {seed}: steps {r.steps_to(stop_at or 2.0):g} "
                         f"best {r.best_acc:.4f} {r.step_seconds:.1f}s {r.stopped}{' diverged' if r.diverged else ''}")
            m = self._metric(self.cache[k], objective)
            if objective != "acc" and not math.isfinite(m):
                if i + 1 < len(self.seeds):
                    self.log(f"  {fmt_config(config)}: seed {seed} missed the target; remaining seeds skipped")
                break
            done += m if objective != "acc" else 0.0
        return self.score(config, objective)

    def stage(self, current: Dict[str, Any], axis: Axis, objective: str) -> Dict[str, Any]:
        """Sweep one axis around ``current`` (widening at the edges); returns the new current."""
        def cfg(v):
            return dict(current, **{axis.name: v})

        best_v = current[axis.name]
        best = self.evaluate(cfg(best_v), objective)
        widened = 0
        todo = [v for v in axis.grid if v != best_v]
        while True:
            for v in todo:
                s = self.evaluate(cfg(v), objective, bound=best[0])
                if s < best:
                    best_v, best = v, s
            side = axis.edge(best_v)
            new = axis.widen(side) if side is not None else None
            if new is None or widened >= self.max_widen:
                break
            axis.insert(new)
            todo, widened = [new], widened + 1
        self.stages.append({"axis": axis.name, "objective": objective, "grid": list(axis.grid), "chosen": best_v,
                            "status": axis.status(best_v), "widened": widened})
        return cfg(best_v)

    def records(self) -> List[Dict[str, Any]]:
        """Every sweep run as a JSON record (configuration, seed, outcome)."""
        t = self.target[0]
        out = []
        for r in self.cache.values():
            out.append({"config": r.config, "seed": r.seed, "steps_to_target": _finite(r.steps_to(t)) if t else None,
                        "seconds_to_target": _finite(r.seconds_to(t), 3) if t else None,
                        "best_acc": round(r.best_acc, 4), "steps_run": r.n_steps, "seconds": round(r.step_seconds, 2),
                        "stopped": r.stopped, "diverged": r.diverged})
        return out

