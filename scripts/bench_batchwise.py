#!/usr/bin/env python
"""Memory and time of a learned-augmentation marglik step, one-pass against batchwise (``hyper.batchwise``).

One step: ``nb`` batches of ``B`` images, each augmented into ``S`` copies (six affine generators,
``eta`` = 0.2), a differentiable ``KronLaplace`` fit (type-2) on all of them, the log marginal
likelihood at a layerwise prior and its gradient w.r.t. the log prior and ``eta``:

* ``one-pass``: the tuning loop's default; the fit keeps every batch's autograd graph until the
  gradient, so its memory grows with ``nb``;
* ``batchwise``: :func:`marglik.curvature.batchwise.batchwise_gradients`: the batches are fitted without
  a graph, then each is redone with its graph and freed; the memory of one batch, about twice the
  forward and backward passes.

Both give the same numbers (``tests/test_batchwise.py``: 1e-10 in float64); this script also reports
their largest relative difference in float32. Peak extra memory is measured in a fresh process per
(mode, nb) (CPU: resident set size; CUDA: ``max_memory_allocated``); seconds are the median of
``--repeats`` steps, modes interleaved in one process. Model: WRN-16-4 (``norm="none"``, small random
init of the zero-initialised layers), random CIFAR-shaped images.

Writes ``results/batchwise<tag>.{json,md}``::

    python scripts/bench_batchwise.py                      # nb in {1, 2, 4}, B = 8, S = 4, reduce-reduce
    python scripts/bench_batchwise.py --from-json          # re-render the markdown
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from marglik import AffineAugmentation, KronLaplace
from marglik.curvature.batchwise import batchwise_gradients

from benchlib import (
    ROOT,
    in_fresh_process,
    peak_extra_memory,
    pick_device,
    random_batch,
    sync,
    wide_resnet,
    write_result,
)

STEM = "batchwise"
MODES = ("one-pass", "batchwise")


def setup(args, nb: int, device: torch.device):
    """The model, augmentation (``eta`` = 0.2) and ``nb`` raw batches (images, noise, labels)."""
    model = wide_resnet(args.depth, args.width, device, reinit_zero=True)
    aug = AffineAugmentation(n_samples=args.copies).to(device)
    with torch.no_grad():
        aug.eta.fill_(0.2)
    g = torch.Generator().manual_seed(0)
    raw = []
    for _ in range(nb):
        X, y = random_batch(args.batch, args.image, device, generator=g)
        raw.append((X, aug.sample_eps(len(X), g).to(device), y))
    return model, aug, raw


def step(mode: str, args, model, aug, raw) -> Tuple[float, torch.Tensor, torch.Tensor]:
    """One marglik step; returns ``(log marglik, eta grad, log prior grad)``."""
    log_prior = torch.zeros(sum(1 for _ in model.parameters()), device=raw[0][0].device, requires_grad=True)
    la = KronLaplace(model, "classification", approx=args.approx, copies_approx=args.copies_approx,
                     differentiable=True)
    num_data = 50000
    if mode == "one-pass":
        la.fit([(aug(x, eps=e), y) for x, e, y in raw], num_data=num_data)
        lml = la.log_marginal_likelihood(prior_precision=log_prior.exp())
        g_eta, g_prior = torch.autograd.grad(lml, [aug.eta, log_prior])
        return float(lml), g_eta, g_prior
    lml, (g_prior,), (g_eta,) = batchwise_gradients(
        la, raw, lambda r: (aug(r[0], eps=r[1]), r[2]), num_data,
        lambda fitted: fitted.log_marginal_likelihood(prior_precision=log_prior.exp()), [log_prior], [aug.eta])
    return float(lml), g_eta, g_prior


def _memory_child(spec: Dict[str, Any], queue) -> None:
    args = argparse.Namespace(**spec["args"])
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = torch.device(spec["device"])
    model, aug, raw = setup(args, spec["nb"], device)
    try:
        queue.put(peak_extra_memory(lambda: step(spec["mode"], args, model, aug, raw), device))
    except Exception as err:  # reported in the table, not hidden
        queue.put(f"error: {type(err).__name__}: {err}")


def peak_memory(args, mode: str, nb: int, device: torch.device):
    """Peak extra bytes of one step in a fresh process, or the child's error line."""
    spec = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "mode": mode, "nb": nb, "device": str(device)}
    val = in_fresh_process(_memory_child, spec)
    return val if isinstance(val, str) else int(val)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def measure(args, device: torch.device) -> List[Dict[str, Any]]:
    rows = []
    for nb in args.batches:
        model, aug, raw = setup(args, nb, device)
        times: Dict[str, List[float]] = {m: [] for m in MODES}
        outs: Dict[str, Any] = {}
        if nb == args.batches[0]:
            for mode in MODES:  # warm-up (allocator, oneDNN kernels), untimed
                step(mode, args, model, aug, raw)
        for _ in range(args.repeats):
            for mode in MODES:
                sync(device)
                t0 = time.perf_counter()
                outs[mode] = step(mode, args, model, aug, raw)
                sync(device)
                times[mode].append(time.perf_counter() - t0)
        mem = {mode: peak_memory(args, mode, nb, device) for mode in MODES}
        (l1, e1, p1), (l2, e2, p2) = outs["one-pass"], outs["batchwise"]
        row = {"batches": nb, "images": nb * args.batch * args.copies,
               "seconds": {m: statistics.median(t) for m, t in times.items()}, "peak_extra_bytes": mem,
               "rel_diff": {"log_marglik": abs(l2 - l1) / abs(l1), "eta_grad": rel_diff(e2, e1),
                            "prior_grad": rel_diff(p2, p1)}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _mib(v) -> str:
    return v if isinstance(v, str) else f"{v / 2 ** 20:.0f}"


def render(result: Dict[str, Any]) -> str:
    m = result["meta"]
    lines = [
        "# Learned-augmentation marglik step: one-pass against batchwise (`hyper.batchwise`)", "",
        f"- model: {m['model']}; images 3x{m['image']}x{m['image']}, random; B = {m['batch']} images per batch, "
        f"S = {m['copies']} copies, K-FAC {m['approx']}-{m['copies_approx']} (type-2); device {m['device']}; "
        f"torch {m['torch']}, {m['threads']} thread(s); 1-minute load average before / after: "
        f"{m['load_average_1min'][0]:.1f} / {m['load_average_1min'][1]:.1f}",
        "- step: differentiable `KronLaplace` fit on all batches, log marglik at a layerwise prior, gradient "
        "w.r.t. the log prior and `eta`; one-pass keeps every batch's graph until the gradient, batchwise "
        "(`marglik.curvature.batchwise`) fits without graphs and then redoes one batch at a time with its graph",
        f"- seconds: median of {m['repeats']} steps after one untimed warm-up step, modes interleaved in one process; memory: peak extra of one "
        "step in a fresh process (CPU: resident set size; CUDA: max_memory_allocated)", "",
        "| batches | augmented images | one-pass MiB | batchwise MiB | memory batchwise / one-pass | one-pass s | "
        "batchwise s | time batchwise / one-pass | largest relative difference (log marglik, eta grad, prior grad) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        mem, sec, d = r["peak_extra_bytes"], r["seconds"], r["rel_diff"]
        ratio = (f"{mem['batchwise'] / mem['one-pass']:.2f}" if not any(isinstance(v, str) for v in mem.values())
                 else "-")
        lines.append(f"| {r['batches']} | {r['images']} | {_mib(mem['one-pass'])} | {_mib(mem['batchwise'])} | {ratio} | "
                     f"{sec['one-pass']:.2f} | {sec['batchwise']:.2f} | {sec['batchwise'] / sec['one-pass']:.2f} | "
                     f"{d['log_marglik']:.1e}, {d['eta_grad']:.1e}, {d['prior_grad']:.1e} |")
    lines += ["", "Reproduce: `python scripts/bench_batchwise.py" + (" --quick" if m.get("quick") else "") + "".join(
        f" --{k.replace('_', '-')} {v if not isinstance(v, list) else ' '.join(map(str, v))}"
        for k, v in m["argv"].items()) + "`", ""]
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], help="batches per fit (nb)")
    ap.add_argument("--batch", type=int, default=8, help="images per batch (B)")
    ap.add_argument("--copies", type=int, default=4, help="augmented copies per image (S)")
    ap.add_argument("--approx", default="reduce", choices=["reduce", "expand"])
    ap.add_argument("--copies-approx", default="reduce", choices=["reduce", "expand"])
    ap.add_argument("--image", type=int, default=32)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke test: WRN-10-1 on 16x16, B = 1, nb = 2")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--tag", default="", help="suffix of the result files, e.g. _cuda")
    ap.add_argument("--from-json", action="store_true", help="only re-render <out>/batchwise<tag>.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.depth, args.width, args.image, args.batch, args.batches = 10, 1, 16, 1, [2]
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse(argv)
    out = Path(args.out)
    if args.from_json:
        result = json.loads((out / f"{STEM}{args.tag}.json").read_text())
        (out / f"{STEM}{args.tag}.md").write_text(render(result))
        return result
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = pick_device(args.device)
    load_before = os.getloadavg()[0]
    rows = measure(args, device)
    keys = ("batches", "batch", "copies", "approx", "copies_approx", "repeats", "threads")
    meta = {"model": f"WRN-{args.depth}-{args.width} (norm='none')", "image": args.image, "batch": args.batch,
            "copies": args.copies, "approx": args.approx, "copies_approx": args.copies_approx,
            "device": device.type, "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
            "load_average_1min": [load_before, os.getloadavg()[0]], "quick": args.quick,
            "argv": {k: getattr(args, k) for k in keys}}
    result = {"meta": meta, "rows": rows}
    write_result(out, STEM + args.tag, result, render)
    return result


if __name__ == "__main__":
    main()
