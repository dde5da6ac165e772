"""Training runs of ``bench_optimizer.py`` (a library module: no entry point): the warm-up + cosine
schedule, AdamW and K-FAC from a configuration, one seed's run with its validation curve and the
interleaved per-step cost probe."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marglik.optim import KFACOptimizer

from optbench_tasks import Task, call_model


@dataclass
class RunResult:
    """One training run: the validation curve and the training time."""

    opt: str
    config: Dict[str, Any]
    seed: int
    steps: List[int] = field(default_factory=list)  # evaluation steps
    acc: List[float] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)  # cumulative training seconds at each evaluation
    step_seconds: float = 0.0  # training seconds of all steps run
    n_steps: int = 0
    diverged: bool = False
    stopped: str = ""  # "", "target" or "pruned"

    def steps_to(self, target: float) -> float:
        """First evaluation step at or above ``target`` (``inf`` if none)."""
        return next((float(s) for s, a in zip(self.steps, self.acc) if a >= target), math.inf)

    def seconds_to(self, target: float) -> float:
        """Training seconds up to the first evaluation at or above ``target`` (``inf`` if none)."""
        return next((t for t, a in zip(self.seconds, self.acc) if a >= target), math.inf)

    @property
    def best_acc(self) -> float:
        return max(self.acc) if self.acc else 0.0

    @property
    def sec_per_step(self) -> float:
        return self.step_seconds / self.n_steps if self.n_steps else math.nan


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: nn.Module, val: Tuple[Any, Tensor], chunk: int = 512) -> float:
    """Validation accuracy (image inputs in chunks)."""
    model.eval()
    X, y = val
    if isinstance(X, tuple):
        pred = call_model(model, X).argmax(-1)
    else:
        pred = torch.cat([model(X[i : i + chunk]).argmax(-1) for i in range(0, len(X), chunk)])
    model.train()
    return (pred == y).float().mean().item()


def build_optimizer(opt: str, model: nn.Module, config: Dict[str, Any], seed: int) -> torch.optim.Optimizer:
    """AdamW or a K-FAC flavour (``kfac_expand`` / ``kfac_reduce``) from a configuration."""
    if opt == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    return KFACOptimizer(
        model, lr=config["lr"], damping=config["damping"], approx=opt.split("_")[1],
        fisher_type=config.get("fisher_type", "mc"), damping_rule=config.get("damping_rule", "pi"),
        kl_clip=config["kl_clip"], momentum=config["momentum"], factor_ema=config.get("factor_ema", 0.95),
        factor_update_every=int(config["factor_update_every"]),
        inverse_update_every=int(config["inverse_update_every"]), weight_decay=0.0,
        fallback="adamw", fallback_lr=config.get("fallback_lr"), generator=torch.Generator().manual_seed(10_000 + seed),
    )


@dataclass
class Budget:
    """Per-task run settings."""

    steps: int
    eval_every: int
    batch_size: int


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, X: Any, y: Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    if isinstance(opt, KFACOptimizer):
        with opt.track():
            out = call_model(model, X)
        opt.update_factors(out, y)
    else:
        out = call_model(model, X)
    loss = F.cross_entropy(out, y)
    if not torch.isfinite(loss):
        raise FloatingPointError("non-finite loss")
    loss.backward()
    opt.step()


def train_run(task: Task, opt_name: str, config: Dict[str, Any], seed: int, budget: Budget,
              stop_at: Optional[float] = None, max_steps: float = math.inf, max_seconds: float = math.inf
              ) -> RunResult:
    """Train one seed under the warm-up + cosine schedule of ``budget``.

    ``stop_at``: stop at the first evaluation at or above this accuracy. ``max_steps`` /
    ``max_seconds``: stop (``stopped="pruned"``) at the first evaluation beyond them that has not
    reached ``stop_at``.
    """
    torch.manual_seed(seed)
    model = task.make_model()
    opt = build_optimizer(opt_name, model, config, seed)
    base = [(g["lr"], g.get("kl_clip")) for g in opt.param_groups]
    warmup = max(1, round(config["warmup"] * budget.steps))
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(task.train_size, generator=gen), 0
    res = RunResult(opt_name, dict(config), seed)
    for step in range(budget.steps):
        if pos + budget.batch_size > task.train_size:
            perm, pos = torch.randperm(task.train_size, generator=gen), 0
        X, y = task.get_batch(perm[pos : pos + budget.batch_size], gen)
        pos += budget.batch_size
        f = lr_factor(step, budget.steps, warmup)
        for g, (lr, kl_clip) in zip(opt.param_groups, base):
            g["lr"] = lr * f
            if kl_clip is not None:  # the clipped step length sqrt(kl_clip / v'g) follows the schedule too
                g["kl_clip"] = kl_clip * f * f
        t0 = time.perf_counter()
        try:
            _train_step(model, opt, X, y)
        except FloatingPointError:
            res.diverged = True
            break
        res.step_seconds += time.perf_counter() - t0
        res.n_steps += 1
        if (step + 1) % budget.eval_every == 0 or step + 1 == budget.steps:
            acc = evaluate(model, task.val)
            res.steps.append(step + 1)
            res.acc.append(acc)
            res.seconds.append(res.step_seconds)
            if stop_at is not None and acc >= stop_at:
                res.stopped = "target"
                break
            if step + 1 >= max_steps or res.step_seconds >= max_seconds:
                res.stopped = "pruned"
                break
    return res


def measure_costs(task: Task, configs: Dict[str, Dict[str, Any]], budget: Budget, steps: int = 72,
                  rounds: int = 3) -> Dict[str, Dict[str, float]]:
    """Median training seconds per step by kind, the optimisers interleaved in ``rounds`` rounds
    (so that a shared machine's load hits them alike).

    AdamW: ``{"plain"}``. K-FAC (run with factors every 2 and inverses every 3 steps, to see every
    kind of step): ``plain`` (preconditioning only), ``factor`` and ``inverse`` (the extra seconds of
    a factor / inverse update over a plain step). Learning rates are scaled by 0.01 (the cost does
    not depend on them; this keeps the probe finite) and the first 6 steps are not counted.
    """
    gen = torch.Generator().manual_seed(0)
    runs = {}
    for opt, cfg in configs.items():
        torch.manual_seed(0)
        model = task.make_model()
        cfg = dict(cfg, lr=cfg["lr"] * 0.01, factor_update_every=2, inverse_update_every=3)
        runs[opt] = (model, build_optimizer(opt, model, cfg, 0), {"plain": [], "factor": [], "inverse": [], "both": []})
    for rnd in range(rounds):
        for model, o, times in runs.values():
            for i in range(steps // rounds):
                X, y = task.get_batch(torch.randint(0, task.train_size, (budget.batch_size,), generator=gen), gen)
                k = o.steps if isinstance(o, KFACOptimizer) else 1
                t0 = time.perf_counter()
                _train_step(model, o, X, y)
                if rnd or i >= 6:
                    kind = {(True, True): "both", (True, False): "factor", (False, True): "inverse"}.get(
                        (k % 2 == 0, k % 3 == 0), "plain")
                    times[kind].append(time.perf_counter() - t0)
    out = {}
    for opt, (_, _, times) in runs.items():
        med = {k: statistics.median(v) for k, v in times.items() if v}
        if opt == "adamw":
            out[opt] = {"plain": med["plain"]}
        else:
            out[opt] = {"plain": med["plain"], "factor": max(0.0, med["factor"] - med["plain"]),
                        "inverse": max(0.0, med["inverse"] - med["plain"])}
    return out


def step_cost(costs: Dict[str, Dict[str, float]], opt: str, config: Dict[str, Any]) -> float:
    """Modelled seconds per step: a plain step plus the factor / inverse updates amortised over
    their periods (AdamW: its plain step)."""
    c = costs[opt]
    if opt == "adamw":
        return c["plain"]
    return c["plain"] + c["factor"] / config["factor_update_every"] + c["inverse"] / config["inverse_update_every"]

