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
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marglik.augment import AffineAugmentation
from marglik.data import collate_graphs, load_dataset, make_graph_dataset
from marglik.models import GNN, TorchvisionViT, ViT
from marglik.optim import KFACOptimizer

from benchlib import ROOT, write_result

OPTIMIZERS = ("adamw", "kfac_expand", "kfac_reduce")
PAPER_RANGE = (0.50, 0.75)
CRITERIA = {"steps_ratio_max": 0.75, "seconds_ratio_max": 1.0, "all_seeds_reach": True}
SENSITIVITY_FRACS = (0.95, 0.96, 0.97, 0.98, 0.99)
SWEEP_SEEDS = (100, 101, 102)
SCHEMA = "optimizer_steps_to_target/2"


# ----------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """A training task: model factory, batch sampler and validation set."""

    name: str
    make_model: Callable[[], nn.Module]
    train_size: int
    get_batch: Callable[[Tensor, torch.Generator], Tuple[Any, Tensor]]  # (indices, generator) -> (input, y)
    val: Tuple[Any, Tensor]
    description: str


def _call(model: nn.Module, X: Any) -> Tensor:
    return model(*X) if isinstance(X, tuple) else model(X)


TVVIT_MODEL = dict(image_size=16, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128)
TVVIT_WARP = dict(rotation_deg=20.0, shift=0.15, log_scale=0.1, val_copies=4)


def digit_warps(rotation_deg: float, shift: float, log_scale: float) -> AffineAugmentation:
    """Random affine warps of fixed ranges: rotation (degrees), shifts (fraction of the image side)
    and an isotropic log-scale (``scale_x = scale_y``, one shared draw)."""
    aug = AffineAugmentation(1, ("rotation", "translation_x", "translation_y", "scale_x", "scale_y"))
    with torch.no_grad():  # translations in normalised units: the side spans 2
        aug.eta.copy_(torch.tensor([math.radians(rotation_deg), 2 * shift, 2 * shift, log_scale, log_scale]))
    aug.requires_grad_(False)
    return aug


def _warp(aug: AffineAugmentation, x: Tensor, gen: torch.Generator) -> Tensor:
    eps = aug.sample_eps(len(x), gen)
    eps[..., 4] = eps[..., 3]  # isotropic scale
    return aug(x, eps=eps)[:, 0]


def make_tvvit_task(model_kwargs: Optional[Dict[str, Any]] = None) -> Task:
    """torchvision ViT on upsampled digits under fresh random affine warps every step."""
    mk = dict(TVVIT_MODEL, **(model_kwargs or {}))
    train, val, _ = load_dataset("digits", upsample=mk["image_size"])
    X, y = train.tensors
    aug = digit_warps(TVVIT_WARP["rotation_deg"], TVVIT_WARP["shift"], TVVIT_WARP["log_scale"])
    Xv, yv = val.tensors
    gv = torch.Generator().manual_seed(12345)
    copies = TVVIT_WARP["val_copies"]
    with torch.no_grad():
        val_x = torch.cat([_warp(aug, Xv, gv) for _ in range(copies)])

    def make_model() -> nn.Module:
        return TorchvisionViT(in_channels=1, num_classes=10, **mk)

    def get_batch(idx: Tensor, gen: torch.Generator):
        with torch.no_grad():
            return _warp(aug, X[idx], gen), y[idx]

    return Task(
        "tvvit", make_model, len(X), get_batch, (val_x, yv.repeat(copies)),
        f"torchvision VisionTransformer ({mk['image_size']}x{mk['image_size']} inputs, {mk['patch_size']}x"
        f"{mk['patch_size']} patches, width {mk['hidden_dim']}, {mk['num_layers']} layers, {mk['num_heads']} heads, "
        f"MLP {mk['mlp_dim']}) on digits upsampled to {mk['image_size']}x{mk['image_size']} under fresh random "
        f"affine warps every step (rotation +-{TVVIT_WARP['rotation_deg']:g} deg, shifts +-"
        f"{100 * TVVIT_WARP['shift']:g}%, log-scale +-{TVVIT_WARP['log_scale']:g}); validation: 360 held-out "
        f"digits x {copies} fixed warps ({360 * copies} images)",
    )


def make_vit_task() -> Task:
    """marglik's ViT on 8x8 digits (no augmentation)."""
    train, val, _ = load_dataset("digits")
    X, y = train.tensors

    def make_model() -> nn.Module:
        return ViT(image_size=8, patch_size=2, in_channels=1, num_classes=10, dim=64, depth=2, heads=4, mlp_dim=128)

    return Task(
        "vit", make_model, len(X), lambda idx, gen: (X[idx], y[idx]), tuple(val.tensors),
        "ViT (2x2 patches, 16 tokens, width 64, depth 2, 4 heads) on digits 8x8 (1437 train / 360 val)",
    )


def make_gnn_task(num_train: int = 2000, num_val: int = 500) -> Task:
    """GIN-style GNN on the generated hub-edge graph task."""
    train = make_graph_dataset(num_train, seed=0)
    val = make_graph_dataset(num_val, seed=1)
    vb, vy = collate_graphs(val)

    def make_model() -> nn.Module:
        return GNN(in_dim=1, hidden_dim=64, num_classes=2, num_layers=3, readout="mean", aggregation="sum")

    def get_batch(idx: Tensor, gen: torch.Generator):
        b, yb = collate_graphs([train[i] for i in idx.tolist()])
        return tuple(b), yb

    return Task(
        "gnn", make_model, len(train), get_batch, (tuple(vb), vy),
        f"GIN-style GNN (3 layers, width 64, sum aggregation, mean readout) on the generated hub-edge task "
        f"({num_train} train / {num_val} val graphs, 6-14 nodes)",
    )


MAKERS = {"tvvit": make_tvvit_task, "gnn": make_gnn_task, "vit": make_vit_task}


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


# ----------------------------------------------------------------------------------------- runs
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
        pred = _call(model, X).argmax(-1)
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
            out = _call(model, X)
        opt.update_factors(out, y)
    else:
        out = _call(model, X)
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


# ----------------------------------------------------------------------------------------- search
def _key(config: Dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def fmt_value(v: Any) -> str:
    """A hyperparameter value: floats in ``%g``, ``None`` (KL clipping off) as ``off``."""
    return "off" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def fmt_config(cfg: Dict[str, Any]) -> str:
    """``k=v`` list of a configuration (without the ViT's ``fallback_lr``)."""
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in cfg.items() if k != "fallback_lr")


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


def _finite(x: float, digits: Optional[int] = None) -> Optional[float]:
    if not math.isfinite(x):
        return None
    return round(x, digits) if digits is not None else x


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


def render(result: Dict[str, Any], out: Path, stem: str) -> None:
    """Write JSON, markdown and figure."""
    write_result(out, stem, result, render_markdown)
    render_figure(result, Path(out) / f"{stem}.png")


def portable_argv(argv: Sequence[str]) -> List[str]:
    """The recorded command without ``--raw FILE`` (a scratch dump on the machine that ran it)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--raw":
            skip = True
        elif not a.startswith("--raw="):
            out.append(a)
    return out


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


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
                 "json": _rel(out / f"{args.out_name}.json"), "figure": _rel(out / f"{args.out_name}.png"),
                 "seeds": list(range(1, args.seeds + 1)), "sweep_seeds": list(SWEEP_SEEDS[: args.sweep_seeds]),
                 "torch_threads": torch.get_num_threads(), "total_seconds": round(time.time() - t0, 1),
                 "paper_steps_ratio_range": PAPER_RANGE, "criteria": CRITERIA, "reductions": args.reductions},
    }
    render(result, out, args.out_name)
    return result


if __name__ == "__main__":
    main()
