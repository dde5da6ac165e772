"""K-FAC speed on torchvision's VisionTransformer: expand vs reduce, marglik vs curvlinops (a
library module, no entry point: run by ``python scripts/bench_kfac.py --vit`` or
``python scripts/bench_kfac_vit.py``); writes ``results/kfac_speed_vit.{md,json}``. One process,
fixed thread count, one random CIFAR-shaped batch; medians of ``--repeats`` rounds in which every
contender runs once (interleaved, so load changes on a shared machine affect all alike); only
ratios are meaningful.

* marglik on the whole ViT (``nn.MultiheadAttention`` q/k/v as a 3-group block, ``out_proj``,
  MLP Linears, LayerNorms, the patch-embedding Conv2d, class token and positional embedding),
  expand vs reduce, type-2 and mc, against one plain forward + backward of the summed loss.
* curvlinops' ``KFACLinearOperator`` covers ``nn.Linear`` / ``nn.Conv2d`` modules that are
  *called*; attention's packed ``in_proj_weight`` and ``out_proj`` (applied inside
  ``F.multi_head_attention_forward``), the raw class token and positional embedding are outside
  its reach. The comparison therefore runs both libraries on the subset curvlinops supports (the
  patch embedding, the MLP Linears and the head; marglik with everything else in
  ``ignore_modules``), after checking that their type-2 factors agree there.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

import marglik

from benchlib import RESULTS, sync, write_result

STEM = "kfac_speed_vit"
CONFIGS = [("expand", "type-2"), ("reduce", "type-2"), ("expand", "mc"), ("reduce", "mc")]
VIT = dict(image_size=32, patch_size=4, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)


def build(batch_size: int, device: torch.device, seed: int = 0):
    from torchvision.models import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(**VIT).to(device)
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.1)  # torchvision's zero head gives zero output gradients
    X = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    return model, X, y


def curvlinops_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Linear / Conv2d modules the forward calls (not attention's out_proj)."""
    out_projs = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in out_projs}


def subset_ignores(model: nn.Module) -> List[nn.Module]:
    keep = {id(m) for m in curvlinops_modules(model).values()}
    return [m for m in model.modules() if id(m) not in keep and any(True for _ in m.parameters(recurse=False))]


def timed_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, device) -> Dict[str, float]:
    """Median seconds of every contender, timed round-robin (one warm-up each, then ``repeats``
    rounds over all contenders), so that load changes on a shared machine hit all of them alike."""
    for fn in fns.values():
        fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def marglik_kfac(model, X, y, approx, fisher_type, subset=False):
    ignore = subset_ignores(model) if subset else None
    return marglik.KFAC(model, approx=approx, fisher_type=fisher_type, ignore_modules=ignore).fit((X, y))


def curvlinops_kfac(model, X, y, approx, fisher_type):
    from curvlinops import KFACLinearOperator

    params = [p for m in curvlinops_modules(model).values() for p in m.parameters()]
    op = KFACLinearOperator(
        model, nn.CrossEntropyLoss(reduction="sum"), params, [(X, y)], check_deterministic=False,
        fisher_type=fisher_type, kfac_approx=approx, separate_weight_and_bias=False, num_data=X.shape[0],
    )
    op.compute_kronecker_factors()
    return op


def plain_step(model, X, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(X), y, reduction="sum").backward()


def check_subset(model, X, y) -> Dict[str, float]:
    errs = {}
    for approx in ("expand", "reduce"):
        kron = marglik_kfac(model, X, y, approx, "type-2", subset=True)
        op = curvlinops_kfac(model, X, y, approx, "type-2")
        worst = 0.0
        state = op.state_dict()  # public: the computed factors
        for b in kron.blocks:
            A, B = state["input_covariances"][b.name], state["gradient_covariances"][b.name]
            worst = max(worst, ((b.A[0] - A).norm() / A.norm()).item(), ((b.B[0] - B).norm() / B.norm()).item())
        if worst > 1e-3:
            raise AssertionError(f"marglik and curvlinops factors differ on the ViT ({approx}): {worst:.2e}")
        errs[approx] = worst
    return errs


def run(batch_size: int = 32, repeats: int = 3, threads: int = 2, device: str = "auto",
        out: str = str(RESULTS), tag: str = "") -> dict:
    torch.set_num_threads(threads)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model, X, y = build(batch_size, dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"torchvision ViT ({n_params / 1e3:.0f}k params), batch {batch_size}, {dev}, {threads} threads", flush=True)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    errs = check_subset(model, X, y)
    print(f"subset factors match curvlinops: {errs}", flush=True)
    fns: Dict[str, Callable[[], object]] = {"plain_step": lambda: plain_step(model, X, y)}
    for approx, ft in CONFIGS:
        fns[f"marglik_{approx}_{ft}"] = lambda a=approx, f=ft: marglik_kfac(model, X, y, a, f)
        fns[f"marglik_subset_{approx}_{ft}"] = lambda a=approx, f=ft: marglik_kfac(model, X, y, a, f, subset=True)
        fns[f"curvlinops_subset_{approx}_{ft}"] = lambda a=approx, f=ft: curvlinops_kfac(model, X, y, a, f)
    times = timed_interleaved(fns, repeats, dev)
    ratios = {}
    for ft in ("type-2", "mc"):
        ratios[f"marglik expand/reduce {ft} (whole ViT)"] = times[f"marglik_expand_{ft}"] / times[f"marglik_reduce_{ft}"]
    for approx, ft in CONFIGS:
        ratios[f"marglik/curvlinops {approx} {ft} (Linear/Conv2d subset)"] = (
            times[f"marglik_subset_{approx}_{ft}"] / times[f"curvlinops_subset_{approx}_{ft}"])
    for approx, ft in CONFIGS:
        ratios[f"marglik {approx} {ft} / plain forward+backward (whole ViT)"] = (
            times[f"marglik_{approx}_{ft}"] / times["plain_step"])
    result = {
        "setup": {"model": f"torchvision VisionTransformer {VIT}", "params": n_params, "batch_size": batch_size,
                  "input": "3x32x32", "device": str(dev),
                  "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
                  "threads": threads, "repeats": repeats, "torch": torch.__version__,
                  "load_average": f"{load_start:.1f} / {os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan'):.1f}"},
        "subset": sorted(curvlinops_modules(model)),
        "factor_check_max_rel_error_vs_curvlinops_subset": errs,
        "ratios": ratios,
        "seconds_median": times,
    }
    write_result(Path(out), f"{STEM}{tag}", result, to_markdown, indent=1)
    return result


def to_markdown(r: dict) -> str:
    s = r["setup"]
    lines = [
        "# K-FAC speed on torchvision's VisionTransformer: expand vs reduce, marglik vs curvlinops",
        "",
        f"Generated by `scripts/bench_kfac.py --vit` (`scripts/bench_kfac_vit.py`): {s['model']}, "
        f"{s['params'] / 1e3:.0f}k parameters, batch {s['batch_size']} ({s['input']}), device `{s['device']}` "
        f"({s['device_name']}), {s['threads']} threads, median of {s['repeats']} interleaved rounds in one process, "
        f"torch {s['torch']}. Machine load during the run (1-min load average at the start / end): "
        f"{s.get('load_average', 'n/a')}.",
        "",
        "curvlinops' KFACLinearOperator covers only called nn.Linear / nn.Conv2d modules, so the marglik/curvlinops "
        "ratios are on that subset (" + ", ".join(r["subset"]) + "; marglik with every other module ignored). "
        "Type-2 factors on the subset, max relative error vs curvlinops: "
        + ", ".join(f"{k} {v:.1e}" for k, v in r["factor_check_max_rel_error_vs_curvlinops_subset"].items()) + ".",
        "",
        "| ratio | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["ratios"].items()]
    lines += ["", "Seconds (median; for the ratios only):", "", "| run | s |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in r["seconds_median"].items()]
    return "\n".join(lines) + "\n"
