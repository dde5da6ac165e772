"""Time of one Laplace log-marginal-likelihood evaluation plus its gradient: marglik vs laplace-torch.

Setting: WRN-16-4 (``marglik.models.WideResNet(depth=16, widen_factor=4, norm="none")``: only
Conv2d and Linear with biases, so laplace-torch's curvlinops backend supports every layer), CIFAR
shapes ``(3, 32, 32)``, 10 classes, **random** images and labels (the timing of the marginal
likelihood does not depend on the data). The Fixup-style zero initialisation of the residual
branches' last convs and the classifier is replaced by a small random one, so that the curvature
is not trivially zero. Both Laplace approximations are fitted once (K-FAC-expand, type-2 GGN --
laplace-torch's default ``kfac_approx``) on ``--n-data`` images; then each timed call evaluates
the log marginal likelihood at a layerwise prior precision ``exp(log_prior)`` and back-propagates to
``log_prior`` (one entry per parameter tensor, laplace-torch's convention) -- the inner step of
``optimize_prior_precision`` and of online marginal-likelihood hyperparameter learning -- at three
prior strengths: marglik sums the Kronecker eigenvalue products that are tiny against the prior in
closed form, so its cost depends on how many products are not (reported per setting).

Contenders:

* ``laplace-torch``: ``laplace.KronLaplace`` with the ``CurvlinopsGGN`` backend;
* ``marglik (separate bias)``: ``marglik.KronLaplace(separate_bias=True)`` -- the same block
  structure as laplace-torch (the float32 results of both are compared with a float64 evaluation);
* ``marglik (joint blocks)``: ``marglik.KronLaplace`` default, weight and bias in one block with
  their cross terms (exact layerwise prior through the matrix determinant lemma).

Reported: the median over ``--repeats`` timed calls (after warm-up) and the ratio
``laplace-torch / marglik`` of the medians. All in one process, ``torch.set_num_threads`` fixed.

Usage::

    python scripts/bench_marglik.py              # writes results/marglik_speed.{md,json}
    python scripts/bench_marglik.py --n-data 32 --repeats 5 --out /tmp/bench
    python scripts/bench_marglik.py --from-json  # re-render the markdown from the JSON alone
    python scripts/bench_marglik.py --device cuda --tag _cuda   # results/marglik_speed_cuda.{md,json}
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import marglik

from benchlib import RESULTS, random_batch, sync, wide_resnet, write_result
from runner import rerender

STEM = "marglik_speed"


def build(n_data: int, device: torch.device, seed: int = 0, quick: bool = False):
    """WRN-16-4 (``quick``: WRN-10-1 on 16x16) with the zero initialisation undone (else every B
    factor below the head is 0), and ``n_data`` random images."""
    model = wide_resnet(10, 1, device, seed, reinit_zero=True) if quick else wide_resnet(16, 4, device, seed,
                                                                                           reinit_zero=True)
    X, y = random_batch(n_data, 16 if quick else 32, device)
    return model, X, y


def lml_step(la, log_prior: torch.Tensor):
    """One log marglik evaluation at ``exp(log_prior)`` and its gradient w.r.t. ``log_prior``."""
    lp = log_prior.detach().clone().requires_grad_(True)
    lml = la.log_marginal_likelihood(prior_precision=lp.exp())
    lml.backward()
    return lml.detach(), lp.grad


def time_round_robin(contenders: dict, log_prior: torch.Tensor, repeats: int, warmup: int, device):
    """Time every contender ``repeats`` times, interleaved so that machine load hits all alike."""
    times = {name: [] for name in contenders}
    for _ in range(warmup):
        for la in contenders.values():
            lml_step(la, log_prior)
    for _ in range(repeats):
        for name, la in contenders.items():
            sync(device)
            t = time.perf_counter()
            lml_step(la, log_prior)
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def float64_reference(la_sep, log_prior: torch.Tensor):
    """Log det ratio and d log marglik / d log_prior in float64 from the float32 eigenvalues.

    Uses marglik's separate-bias decomposition (every block has a constant prior):
    ``log det ratio = sum log1p(s lam / p_l)``, ``d/d log p_l = -sum s lam / (s lam + p_l)``.
    The Kronecker eigenvalues are the same for both libraries up to float32 rounding of the factors.
    """
    p = log_prior.double().exp()
    s = float(la_sep._H_factor)
    ratio = torch.zeros((), dtype=torch.float64)
    dratio = torch.zeros_like(p)
    for e in la_sep.posterior.kron_blocks:
        layer = e.iw if e.iw is not None else e.ib
        slam = s * e.lam.double()
        ratio = ratio + torch.log1p(slam / p[layer]).sum()
        dratio[layer] += -(slam / (slam + p[layer])).sum()
    delta = (la_sep.mean - la_sep.prior_mean).double()
    sq = torch.stack([t.pow(2).sum() for t in delta.split(la_sep._layer_sizes)])
    grad = -0.5 * (dratio + p * sq)
    return ratio, grad


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-data", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--quick", action="store_true", help="smoke test: WRN-10-1 on 16x16 (scripts/device_check.sh)")
    ap.add_argument("--tag", default="", help="suffix for the result files (e.g. _cuda)")
    ap.add_argument("--from-json", action="store_true",
                    help="only re-render <out>/marglik_speed<tag>.md from its JSON")
    args = ap.parse_args(argv)
    if args.from_json:
        rerender(Path(args.out), f"{STEM}{args.tag}", render)
        return

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore")
    from laplace import KronLaplace as LTKronLaplace
    from laplace.curvature import CurvlinopsGGN

    model, X, y = build(args.n_data, device, quick=args.quick)
    loader = DataLoader(TensorDataset(X, y), batch_size=args.batch_size)
    n_layers = sum(1 for _ in model.parameters())
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(n_layers, generator=g) * 0.5
    # layerwise priors from moderate (precision ~ e) to very weak (~ e^-20): the weaker the prior, the
    # more Kronecker eigenvalue products are large against it (marglik's tail shortcut helps less)
    settings = {"moderate prior (log p ~ N(1, 0.5^2))": (noise + 1.0).to(device),
                "weak prior (log p ~ N(-8, 0.5^2))": (noise - 8.0).to(device),
                "very weak prior (log p ~ N(-20, 0.5^2))": (noise - 20.0).to(device)}
    log_prior0 = next(iter(settings.values()))

    contenders, fit_times = {}, {}
    t = time.perf_counter()
    lt = LTKronLaplace(model, "classification", backend=CurvlinopsGGN, prior_precision=log_prior0.exp())
    lt.fit(loader)
    fit_times["laplace-torch"] = time.perf_counter() - t
    contenders["laplace-torch"] = lt
    t = time.perf_counter()
    ours_sep = marglik.KronLaplace(model, "classification", approx="expand", separate_bias=True,
                                   prior_precision=log_prior0.exp()).fit(loader)
    fit_times["marglik (separate bias)"] = time.perf_counter() - t
    contenders["marglik (separate bias)"] = ours_sep
    t = time.perf_counter()
    ours_joint = marglik.KronLaplace(model, "classification", approx="expand",
                                     prior_precision=log_prior0.exp()).fit(loader)
    fit_times["marglik (joint blocks)"] = time.perf_counter() - t
    contenders["marglik (joint blocks)"] = ours_joint

    all_results = {}
    for setting, log_prior in settings.items():
        times = time_round_robin(contenders, log_prior, args.repeats, args.warmup, device)
        ref_ratio, ref_grad = float64_reference(ours_sep, log_prior)
        # share of Kronecker eigenvalue products s lam / p above marglik's tail threshold eps^(1/3)
        tau = torch.finfo(torch.float32).eps ** (1 / 3)
        p = log_prior.exp()
        big = sum(int(((float(ours_sep._H_factor) * e.lam / p[e.iw if e.iw is not None else e.ib]) >= tau).sum())
                  for e in ours_sep.posterior.kron_blocks)
        results = {}
        for name, la in contenders.items():
            value, grad = lml_step(la, log_prior)
            r = {
                "median_s": statistics.median(times[name]),
                "min_s": min(times[name]),
                "times_s": times[name],
                "log_marglik": float(value),
                "log_det_ratio": float(la.log_det_ratio),
                "fit_s": fit_times[name],
            }
            if name != "marglik (joint blocks)":  # same posterior as the float64 reference
                err = (grad.double() - ref_grad).abs()
                r["grad_rel_err_vs_float64"] = float(err.norm() / ref_grad.norm())
                r["log_det_ratio_abs_err_vs_float64"] = abs(float(la.log_det_ratio) - float(ref_ratio))
            results[name] = r
            print(f"[{setting}] {name:26s} median {r['median_s'] * 1e3:8.2f} ms   log marglik {float(value):.6e}",
                  flush=True)
        ref = results["laplace-torch"]
        for name in ("marglik (separate bias)", "marglik (joint blocks)"):
            results[name]["speedup_vs_laplace_torch"] = ref["median_s"] / results[name]["median_s"]
        all_results[setting] = {
            "results": results,
            "float64_reference": {"log_det_ratio": float(ref_ratio), "grad_norm": float(ref_grad.norm())},
            "fraction_products_above_tail_threshold": big / ours_sep.n_params,
        }

    meta = {
        "model": f"{'WRN-10-1' if args.quick else 'WRN-16-4'} (norm='none'), {sum(p.numel() for p in model.parameters()):,} "
                 f"parameters, {sum(1 for _ in model.parameters())} parameter tensors",
        "data": f"{args.n_data} random CIFAR-shaped images (3x32x32), 10 random labels, batch size {args.batch_size}",
        "kfac": "expand, type-2 GGN (both libraries), float32",
        "timed": "one log_marginal_likelihood(prior_precision=exp(log_prior)) + backward to the layerwise log_prior",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
        "device": str(device) if device.type != "cpu" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "fit_s": fit_times,
        "n_data": args.n_data,
        "batch_size": args.batch_size,
    }
    data = {"meta": meta, "settings": all_results}
    write_result(Path(args.out), f"{STEM}{args.tag}", data, render)


def render(data: dict) -> str:
    """The report, from the result JSON alone."""
    meta = data["meta"]
    # the reproduce line's sizes (older JSON: only inside the data description)
    n_data = meta.get("n_data") or int(re.match(r"(\d+) ", meta["data"]).group(1))
    batch_size = meta.get("batch_size") or int(re.search(r"batch size (\d+)", meta["data"]).group(1))
    lines = [
        "# Log marginal likelihood + gradient: marglik vs laplace-torch (WRN-16-4)",
        "",
        f"- model: {meta['model']}",
        f"- data: {meta['data']} (random data: the timing does not depend on it)",
        f"- curvature: {meta['kfac']}; each Laplace fitted once (fit time, s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in meta["fit_s"].items()) + ")",
        f"- timed: {meta['timed']}",
        f"- {meta['repeats']} repetitions after {meta['warmup']} warm-up calls, interleaved round-robin over the "
        f"contenders (the machine may be shared), median reported; device {meta['device']}, "
        f"torch.set_num_threads({meta['threads']}), torch {meta['torch']}",
        "",
    ]
    for setting, block in data["settings"].items():
        lines += [
            f"## {setting}",
            "",
            f"Kronecker eigenvalue products above marglik's tail threshold: "
            f"{100 * block['fraction_products_above_tail_threshold']:.2f}% of P; float64 log det ratio "
            f"{block['float64_reference']['log_det_ratio']:.6g}.",
            "",
            "| contender | median (ms) | min (ms) | speedup vs laplace-torch | log det ratio abs. err | grad rel. err |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in block["results"].items():
            sp = r.get("speedup_vs_laplace_torch", 1.0)
            e1 = f"{r['log_det_ratio_abs_err_vs_float64']:.1e}" if "grad_rel_err_vs_float64" in r else "n/a"
            e2 = f"{r['grad_rel_err_vs_float64']:.1e}" if "grad_rel_err_vs_float64" in r else "n/a"
            lines.append(f"| {name} | {r['median_s'] * 1e3:.2f} | {r['min_s'] * 1e3:.2f} | {sp:.2f}x | {e1} | {e2} |")
        lines.append("")
    lines += [
        "Speedup = median time of laplace-torch / median time of marglik (higher is better).",
        "Errors of the float32 runs are against a float64 evaluation of the same posterior from the",
        "same Kronecker eigenvalues: absolute error of the log det ratio, and ||g - g_ref|| / ||g_ref||",
        "for the gradient w.r.t. the layerwise log prior precision. laplace-torch subtracts",
        "log det(prior) from log det(posterior), two float32 sums of millions of terms, which costs",
        "accuracy; marglik evaluates the ratio directly. The joint-block variant evaluates a different",
        "(weight-bias cross terms kept) posterior, so it has no error column.",
        "",
        "Reproduce: `python scripts/bench_marglik.py "
        f"--n-data {n_data} --batch-size {batch_size} --repeats {meta['repeats']} --threads {meta['threads']}`",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
