"""Speed and memory of marglik's K-FAC against curvlinops and laplace-torch on a WRN-16-4.

All timings come from one process with a fixed thread count, on the same model (WRN-16-4,
``norm="none"`` so every peer supports every layer: only Conv2d and Linear) and the same
random CIFAR-shaped batch; only ratios are reported. Before timing, marglik's type-2 factors are
checked against curvlinops' (expand and reduce). Peak memory of expand vs reduce is measured in
fresh child processes (CPU: increase of the peak resident set size over the process holding
only the model and data; GPU: ``torch.cuda.max_memory_allocated``).

Ablations, timed in the same process: marglik with ``channels_last=False`` (the input's layout
kept), both libraries on a channels-last input (the layout-equal comparison), and K-FAC-expand
with the unfolded instead of the shifted-correlation convolution input Gram.

Usage::

    python scripts/bench_kfac.py                 # writes results/kfac_speed.{md,json}
    python scripts/bench_kfac.py --batch-size 16 --repeats 2 --out /tmp/bench
    python scripts/bench_kfac.py --backpack      # BackPACK KFLR/KFAC on a Sequential CNN:
                                                 # results/kfac_speed_backpack.{md,json}
    python scripts/bench_kfac.py --vit           # torchvision's ViT instead: results/kfac_speed_vit.{md,json}
                                                 # (scripts/kfac_vit.py)
    python scripts/bench_kfac.py --from-json     # re-render results/kfac_speed.md from its JSON alone
                                                 # (with --backpack / --vit: that report's)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as F

import marglik

from benchlib import RESULTS, RSSPeak, in_fresh_process, pick_device, random_batch, timed, wide_resnet, write_result
from kfac_vit import STEM as VIT_STEM
from kfac_vit import run as run_vit
from kfac_vit import to_markdown as vit_markdown
from runner import rerender

CONFIGS = [("expand", "type-2"), ("reduce", "type-2"), ("expand", "mc"), ("reduce", "mc")]


#: the benchmark model: WRN-16-4 on 32x32 (``--quick``: WRN-10-1 on 16x16, a smoke test)
FULL, QUICK = (16, 4, 32), (10, 1, 16)


def build(batch_size: int, device: torch.device, seed: int = 0, size=FULL):
    depth, width, image = size
    model = wide_resnet(depth, width, device, seed)
    X, y = random_batch(batch_size, image, device)
    return model, X, y


# ------------------------------------------------------------------ the contenders
def plain_step(model, X, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(X), y, reduction="sum").backward()


def marglik_kfac(model, X, y, approx, fisher_type, **options):
    kfac = marglik.KFAC(model, "classification", approx=approx, fisher_type=fisher_type, mc_samples=1, **options)
    return kfac.fit((X, y))


@contextlib.contextmanager
def unfolded_conv_gram():
    """Ablation: K-FAC-expand's convolution input factors from the unfolded patch matrix."""
    from marglik.curvature.layers import conv

    saved = conv._LAG_GRAM_MAX_COST
    conv._LAG_GRAM_MAX_COST = 0.0
    try:
        yield
    finally:
        conv._LAG_GRAM_MAX_COST = saved


def curvlinops_kfac(model, X, y, approx, fisher_type):
    from curvlinops import KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    op = KFACLinearOperator(
        model, torch.nn.CrossEntropyLoss(reduction="sum"), params, [(X, y)],
        check_deterministic=False, fisher_type=fisher_type, kfac_approx=approx,
        separate_weight_and_bias=False, num_data=X.shape[0],
    )
    op.compute_kronecker_factors()
    return op


def laplace_asdl_kron(model, X, y):
    from laplace.curvature import AsdlGGN

    backend = AsdlGGN(model, "classification", stochastic=False)
    return backend.kron(X, y, N=X.shape[0])


# ------------------------------------------------------------------ checks
def check_against_curvlinops(model, X, y) -> Dict[str, float]:
    errs = {}
    for approx in ("expand", "reduce"):
        kron = marglik_kfac(model, X, y, approx, "type-2")
        op = curvlinops_kfac(model, X, y, approx, "type-2")
        worst = 0.0
        state = op.state_dict()  # public: the computed factors
        for b in kron.blocks:
            A, B = state["input_covariances"][b.name], state["gradient_covariances"][b.name]
            worst = max(worst, ((b.A[0] - A).norm() / A.norm()).item(), ((b.B[0] - B).norm() / B.norm()).item())
        errs[approx] = worst
        if worst > 1e-3:
            raise AssertionError(f"marglik and curvlinops factors differ ({approx}): rel. error {worst:.2e}")
    return errs


# ------------------------------------------------------------------ memory (child processes)
def _memory_child(args, queue) -> None:
    """Peak memory of one run in a fresh process, over the model and data alone."""
    what, approx, fisher_type, batch_size, device_name, threads, size = args
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    model, X, y = build(batch_size, device, size=size)

    def run():
        if what == "plain":
            plain_step(model, X, y)
        elif what == "marglik":
            marglik_kfac(model, X, y, approx, fisher_type)
        else:
            curvlinops_kfac(model, X, y, approx, fisher_type)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        queue.put(max(torch.cuda.max_memory_allocated() - base, 0))
        return
    with RSSPeak() as rss:
        run()
    queue.put(max(rss.peak - rss.base, 0))


def peak_extra_memory(what, approx, fisher_type, batch_size, device, threads, size=FULL) -> int:
    return int(in_fresh_process(_memory_child, (what, approx, fisher_type, batch_size, str(device), threads, size)))


# ------------------------------------------------------------------ main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="", help="suffix for the result files (e.g. _h100)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke test: WRN-10-1 on 16x16 (scripts/device_check.sh)")
    ap.add_argument("--backpack", action="store_true",
                    help="instead: BackPACK's KFLR/KFAC vs marglik and curvlinops on an nn.Sequential CNN "
                         "(results/kfac_speed_backpack.{md,json})")
    ap.add_argument("--vit", action="store_true", help="benchmark torchvision's ViT (scripts/kfac_vit.py)")
    ap.add_argument("--from-json", action="store_true",
                    help="only re-render the markdown of <out>/kfac_speed[_backpack|_vit]<tag>.json from it alone")
    args = ap.parse_args(argv)
    if args.from_json:
        stem, render = ("kfac_speed_backpack", backpack_markdown) if args.backpack else (
            (VIT_STEM, vit_markdown) if args.vit else ("kfac_speed", to_markdown))
        return rerender(Path(args.out), f"{stem}{args.tag}", render)
    if args.backpack:
        return backpack_benchmark(args)
    if args.vit:
        return run_vit(args.batch_size, args.repeats, args.threads, args.device, args.out, args.tag)

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    size = QUICK if args.quick else FULL
    model, X, y = build(args.batch_size, device, size=size)
    n_params = sum(p.numel() for p in model.parameters())
    model_name = f"WRN-{size[0]}-{size[1]} on {size[2]}x{size[2]}"
    print(f"{model_name} ({n_params / 1e6:.2f}M params), batch {args.batch_size}, device {device}, "
          f"{args.threads} threads", flush=True)

    errs = check_against_curvlinops(model, X, y)
    print(f"factors match curvlinops: max rel. error {errs}", flush=True)

    times: Dict[str, float] = {}
    times["plain_forward_backward"] = timed(lambda: plain_step(model, X, y), args.repeats, device)
    for approx, ft in CONFIGS:
        times[f"marglik_{approx}_{ft}"] = timed(lambda: marglik_kfac(model, X, y, approx, ft), args.repeats, device)
        times[f"curvlinops_{approx}_{ft}"] = timed(
            lambda: curvlinops_kfac(model, X, y, approx, ft), args.repeats, device
        )
        print(f"  {approx:6s} {ft:6s}: marglik {times[f'marglik_{approx}_{ft}']:.3f}s, "
              f"curvlinops {times[f'curvlinops_{approx}_{ft}']:.3f}s", flush=True)
    # the engine's two backward modes: one vmapped backward for all columns vs the hooked loop
    other = device.type != "cuda"  # the mode "auto" does not pick on this device
    times["marglik_reduce_type-2_other_backward"] = timed(
        lambda: marglik_kfac(model, X, y, "reduce", "type-2", batched_backward=other), args.repeats, device
    )
    # where the speed comes from: each of the engine's layout / algorithm choices switched off,
    # and both libraries given a channels-last input (the layout-equal comparison)
    X_cl = X.contiguous(memory_format=torch.channels_last)
    for approx in ("expand", "reduce"):
        times[f"marglik_{approx}_type-2_input_layout_kept"] = timed(
            lambda: marglik_kfac(model, X, y, approx, "type-2", channels_last=False), args.repeats, device
        )
        times[f"marglik_{approx}_type-2_channels_last_input"] = timed(
            lambda: marglik_kfac(model, X_cl, y, approx, "type-2"), args.repeats, device
        )
        times[f"curvlinops_{approx}_type-2_channels_last_input"] = timed(
            lambda: curvlinops_kfac(model, X_cl, y, approx, "type-2"), args.repeats, device
        )
    with unfolded_conv_gram():
        times["marglik_expand_type-2_unfolded_conv_gram"] = timed(
            lambda: marglik_kfac(model, X, y, "expand", "type-2"), args.repeats, device
        )
    try:
        times["laplace_asdl_ggn_kron"] = timed(lambda: laplace_asdl_kron(model, X, y), args.repeats, device)
    except Exception as err:  # report, do not hide, a peer that fails
        print(f"laplace-torch AsdlGGN failed: {err!r}")
        times["laplace_asdl_ggn_kron"] = float("nan")

    plain = times["plain_forward_backward"]
    ratios = {}
    for approx, ft in CONFIGS:
        ratios[f"marglik/curvlinops {approx} {ft}"] = times[f"marglik_{approx}_{ft}"] / times[f"curvlinops_{approx}_{ft}"]
        ratios[f"marglik {approx} {ft} / plain fwd+bwd"] = times[f"marglik_{approx}_{ft}"] / plain
    for ft in ("type-2", "mc"):
        ratios[f"marglik expand/reduce {ft}"] = times[f"marglik_expand_{ft}"] / times[f"marglik_reduce_{ft}"]
        ratios[f"curvlinops expand/reduce {ft}"] = times[f"curvlinops_expand_{ft}"] / times[f"curvlinops_reduce_{ft}"]
    mode = "vmapped / column loop" if device.type != "cuda" else "column loop / vmapped"
    ratios[f"marglik reduce type-2 backward mode: {mode} (default is the divisor)"] = (
        times["marglik_reduce_type-2_other_backward"] / times["marglik_reduce_type-2"]
    )
    ratios["marglik expand type-2 / laplace AsdlGGN kron (expand type-2)"] = (
        times["marglik_expand_type-2"] / times["laplace_asdl_ggn_kron"]
    )
    for approx in ("expand", "reduce"):
        ratios[f"marglik/curvlinops {approx} type-2, both on a channels-last input"] = (
            times[f"marglik_{approx}_type-2_channels_last_input"] / times[f"curvlinops_{approx}_type-2_channels_last_input"]
        )
        ratios[f"marglik/curvlinops {approx} type-2, marglik with channels_last=False"] = (
            times[f"marglik_{approx}_type-2_input_layout_kept"] / times[f"curvlinops_{approx}_type-2"]
        )
    ratios["marglik expand type-2: unfolded / shifted-correlation conv input Gram"] = (
        times["marglik_expand_type-2_unfolded_conv_gram"] / times["marglik_expand_type-2"]
    )

    memory = {}
    if not args.no_memory:
        memory["plain_forward_backward"] = peak_extra_memory("plain", "", "", args.batch_size, device, args.threads, size)
        for what in ("marglik", "curvlinops"):
            for approx, ft in CONFIGS:
                memory[f"{what}_{approx}_{ft}"] = peak_extra_memory(
                    what, approx, ft, args.batch_size, device, args.threads, size
                )
        for what in ("marglik", "curvlinops"):
            for ft in ("type-2", "mc"):
                r = memory[f"{what}_expand_{ft}"] / max(memory[f"{what}_reduce_{ft}"], 1)
                ratios[f"{what} peak memory expand/reduce {ft}"] = r

    targets = {
        "marglik/curvlinops type-2 <= 0.5": all(
            ratios[f"marglik/curvlinops {a} type-2"] <= 0.5 for a in ("expand", "reduce")
        ),
        "marglik reduce mc <= 1.3 x plain fwd+bwd": ratios["marglik reduce mc / plain fwd+bwd"] <= 1.3,
    }
    result = {
        "setup": {
            "model": f"{model_name} (norm='none', Conv2d+Linear only)", "params": n_params,
            "batch_size": args.batch_size, "input": "random CIFAR-shaped 3x32x32, 10 classes",
            "device": str(device), "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
            "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
        },
        "factor_check_max_rel_error_vs_curvlinops": errs,
        "seconds_median": times,
        "ratios": ratios,
        "peak_extra_memory_bytes": memory,
        "targets_met": targets,
    }
    write_result(Path(args.out), f"kfac_speed{args.tag}", result, to_markdown)
    return result


# ------------------------------------------------------------------ BackPACK as a peer (--backpack)
def sequential_cnn(device: torch.device, seed: int = 0) -> torch.nn.Sequential:
    """The ``nn.Sequential`` CNN BackPACK needs (Conv2d / ReLU / MaxPool2d / Flatten / Linear)."""
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    ).to(device)


def backpack_kfac(model, loss_fn, X, y, fisher_type):
    """BackPACK's KFLR (``type-2``) or KFAC (``mc``, one sample) of ``loss_fn`` (the summed
    cross-entropy); ``model`` and ``loss_fn`` must already be ``backpack.extend``-ed. Returns
    ``{param name: [B, A] or [B]}``."""
    from backpack import backpack
    from backpack.extensions import KFAC, KFLR

    ext, field = (KFLR(), "kflr") if fisher_type == "type-2" else (KFAC(mc_samples=1), "kfac")
    model.zero_grad(set_to_none=True)
    with backpack(ext):
        loss_fn(model(X), y).backward()
    return {name: getattr(p, field) for name, p in model.named_parameters()}


def check_against_backpack(model, bp_model, bp_loss, X, y) -> float:
    """Max relative error of BackPACK's KFLR factors against marglik's, where they define the same
    quantity: Linear ``A``, ``B`` = expand's; Conv2d ``A`` = ``R`` x expand's (``R`` output
    positions), ``B`` = reduce's (see ``tests/test_backpack_kflr.py``)."""
    bp = backpack_kfac(bp_model, bp_loss, X, y, "type-2")
    expand = {b.name: b for b in marglik_kfac(model, X, y, "expand", "type-2").blocks}
    reduce = {b.name: b for b in marglik_kfac(model, X, y, "reduce", "type-2").blocks}
    positions = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: positions.__setitem__(n, o[0, 0].numel()))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(X[:1])
    for h in hooks:
        h.remove()
    worst = 0.0
    for name, ex in expand.items():
        din = ex.weight[0].numel()
        B_bp, A_bp = bp[f"{name}.weight"]
        R = positions.get(name, 1)
        B_ref = reduce[name].B[0] if name in positions else ex.B[0]
        for got, want in ((A_bp, R * ex.A[0, :din, :din]), (B_bp, B_ref)):
            worst = max(worst, ((got - want).norm() / want.norm()).item())
    if worst > 1e-3:
        raise AssertionError(f"marglik and BackPACK KFLR factors differ: rel. error {worst:.2e}")
    return worst


def backpack_benchmark(args) -> dict:
    """Timings of BackPACK's KFLR / KFAC next to marglik's and curvlinops' K-FAC on an
    ``nn.Sequential`` CNN; writes ``kfac_speed_backpack{tag}.{md,json}``."""
    import copy

    from backpack import extend

    torch.set_num_threads(args.threads)
    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = torch.device("cpu" if dev == "auto" else dev)
    model = sequential_cnn(device)
    torch.manual_seed(1)
    X = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    bp_model = extend(copy.deepcopy(model))  # BackPACK's hooks stay on its own copy
    bp_loss = extend(torch.nn.CrossEntropyLoss(reduction="sum"))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Sequential CNN ({n_params / 1e6:.2f}M params), batch {args.batch_size}, device {device}, "
          f"{args.threads} threads", flush=True)
    err = check_against_backpack(model, bp_model, bp_loss, X, y)
    print(f"factors match BackPACK KFLR where comparable: max rel. error {err:.1e}", flush=True)

    load_before = os.getloadavg()[0]
    times: Dict[str, float] = {"plain_forward_backward": timed(lambda: plain_step(model, X, y), args.repeats, device)}
    for ft in ("type-2", "mc"):
        times[f"backpack_{ft}"] = timed(lambda: backpack_kfac(bp_model, bp_loss, X, y, ft), args.repeats, device)
        for approx in ("expand", "reduce"):
            times[f"marglik_{approx}_{ft}"] = timed(lambda: marglik_kfac(model, X, y, approx, ft), args.repeats, device)
            times[f"curvlinops_{approx}_{ft}"] = timed(
                lambda: curvlinops_kfac(model, X, y, approx, ft), args.repeats, device
            )
        print(f"  {ft}: " + ", ".join(f"{k} {v:.3f}s" for k, v in times.items() if ft in k), flush=True)
    ratios = {}
    for ft, name in (("type-2", "KFLR"), ("mc", "KFAC")):
        for approx in ("expand", "reduce"):
            ratios[f"marglik {approx} {ft} / BackPACK {name}"] = times[f"marglik_{approx}_{ft}"] / times[f"backpack_{ft}"]
            ratios[f"curvlinops {approx} {ft} / BackPACK {name}"] = (
                times[f"curvlinops_{approx}_{ft}"] / times[f"backpack_{ft}"]
            )
        ratios[f"BackPACK {name} / plain fwd+bwd"] = times[f"backpack_{ft}"] / times["plain_forward_backward"]
    result = {
        "setup": {
            "model": "nn.Sequential CNN: 4 x Conv2d(3x3)+ReLU, 2 MaxPool2d, Linear(4096,128)+ReLU, Linear(128,10)",
            "params": n_params, "batch_size": args.batch_size, "input": "random CIFAR-shaped 3x32x32, 10 classes",
            "device": str(device), "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
            "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
            "load_average_1min": [load_before, os.getloadavg()[0]],  # before / after timing (shared machine)
        },
        "backpack_convention": "KFLR/KFAC of CrossEntropyLoss(reduction='sum'): Linear = K-FAC-expand (= reduce); "
                               "Conv2d = (R * A_expand) x B_reduce, R output positions",
        "factor_check_max_rel_error_vs_backpack_kflr": err,
        "seconds_median": times,
        "ratios": ratios,
    }
    write_result(Path(args.out), f"kfac_speed_backpack{args.tag}", result, backpack_markdown)
    return result


def backpack_markdown(r: dict) -> str:
    s = r["setup"]
    lines = [
        "# K-FAC speed: marglik and curvlinops vs BackPACK (KFLR / KFAC) on a Sequential CNN",
        "",
        f"Generated by `scripts/bench_kfac.py --backpack`: {s['model']}, {s['params'] / 1e6:.2f}M parameters, batch "
        f"{s['batch_size']} ({s['input']}), device `{s['device']}` ({s['device_name']}), {s['threads']} threads, "
        f"median of {s['repeats']} runs in one process, torch {s['torch']}; 1-minute load average "
        f"{s['load_average_1min'][0]:.1f} before and {s['load_average_1min'][1]:.1f} after timing (a shared machine: "
        "ratios are indicative).",
        "",
        f"BackPACK's convention: {r['backpack_convention']}. Before timing, its KFLR factors were checked against "
        f"marglik's where they define the same quantity: max relative error "
        f"{r['factor_check_max_rel_error_vs_backpack_kflr']:.1e}. KFAC (mc) draws one label sample in every library.",
        "",
        "| ratio | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["ratios"].items()]
    lines += ["", "Seconds (median; for the ratios only, absolute times depend on the machine):", "",
              "| run | s |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["seconds_median"].items()]
    return "\n".join(lines) + "\n"


def to_markdown(r: dict) -> str:
    s = r["setup"]
    lines = [
        "# K-FAC speed: marglik vs curvlinops vs laplace-torch (WRN-16-4)",
        "",
        f"Generated by `scripts/bench_kfac.py`: {s['model']}, {s['params'] / 1e6:.2f}M parameters, batch "
        f"{s['batch_size']} ({s['input']}), device `{s['device']}` ({s['device_name']}), {s['threads']} threads, "
        f"median of {s['repeats']} runs in one process, torch {s['torch']}.",
        "",
        "Factor check before timing (type-2, max relative error vs curvlinops): "
        + ", ".join(f"{k} {v:.1e}" for k, v in r["factor_check_max_rel_error_vs_curvlinops"].items()),
        "",
        "| ratio | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["ratios"].items()]
    lines += ["", "| targets | met |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else 'NO'} |" for k, v in r["targets_met"].items()]
    if r["peak_extra_memory_bytes"]:
        lines += ["", "Peak memory of one run in a fresh process, over the model and data alone (MiB; CPU: peak"
                  " resident set size, GPU: max allocated):", "", "| run | MiB |", "|---|---|"]
        lines += [f"| {k} | {v / 2**20:.0f} |" for k, v in r["peak_extra_memory_bytes"].items()]
    lines += ["", "Seconds (median; for the ratios only, absolute times depend on the machine):", "",
              "| run | s |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["seconds_median"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
