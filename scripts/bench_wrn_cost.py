"""Cost of one marginal-likelihood hyperparameter step on WRN-16-4 as the number of augmented copies grows.

The seed paper's claim (Eschenhagen et al. 2023, WRN experiment): K-FAC-reduce makes each
marginal-likelihood step cheaper than K-FAC-expand, and the gap grows with the number of shared
positions. Here one *marglik step* is what the tuning loop (:mod:`marglik.tuning.loop`) does per
hyperstep with learned augmentation:

1. augment a batch of ``B`` images into ``S`` copies with :class:`marglik.AffineAugmentation`
   (learnable ranges ``eta``, all six affine generators, reparameterised noise);
2. fit :class:`marglik.KronLaplace` on the augmented batch (type-2 GGN, ``differentiable=True``,
   so the factors keep their graph to ``eta``);
3. evaluate the log marginal likelihood at a layerwise prior ``exp(log_prior)``;
4. back-propagate to ``log_prior`` and ``eta``.

Flavours (``approx`` governs pixels, ``copies_approx`` the copy axis; see
:class:`marglik.KFAC`):

* ``expand``: expand over pixels and copies (the ablation; not the literature's);
* ``mixed``: expand over pixels, reduce over copies (LILA's "K-FAC-expand" arm);
* ``reduce``: reduce over pixels and copies.

Peer (``S = 1`` only, no augmentation gradient -- its factors are not differentiable):
laplace-torch's ``KronLaplace`` with the ``CurvlinopsGGN`` backend (``kfac_approx`` expand and
reduce), against marglik's same step without augmentation (``marglik-noaug``), timed in the same
process.

Model: ``marglik.models.WideResNet(depth=16, widen_factor=4, norm="none")`` (Conv2d and Linear
only, so curvlinops covers every layer), with the Fixup zero initialisation replaced by a small
random one (else every factor below the head is zero). Data: random CIFAR-shaped images; the
cost does not depend on the values.

Reported per (B, S, flavour): median seconds over ``--repeats`` timed steps (round-robin over the
flavours, so machine load hits all alike), the ratios expand / reduce and mixed / reduce, and the
peak extra memory of one step (CUDA: ``max_memory_allocated``; CPU: peak resident set size of a
fresh child process running one step, over model and data alone), also minus that of two
references on the same augmented batch: ``train-step`` (a plain MAP step: the activations) and
``ggn-backward`` (the K class-wise backward passes of a type-2 GGN with their graphs kept, which a
differentiable fit cannot avoid). What reduce needs beyond ``ggn-backward`` must not grow with S. ``--quick`` shrinks
everything for a smoke test (``tests/test_device_check.py``).

Usage::

    python scripts/bench_wrn_cost.py                      # CPU: writes results/wrn_cost.{md,json}
    python scripts/bench_wrn_cost.py --device cuda --tag _cuda
    python scripts/bench_wrn_cost.py --quick --out /tmp/x # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from benchlib import RESULTS, in_fresh_process, peak_extra_memory, pick_device, write_result
from runner import rerender
from wrn_steps import (
    FLAVOURS,
    GGN_BACKWARD,
    TRAIN_STEP,
    build_data,
    build_model,
    ggn_backward_step,
    marglik_step,
    peer_step,
    time_round_robin,
    train_step,
)


def contenders(S: int, with_peer: bool) -> Dict[str, Callable]:
    """name -> fn(model, X, y, num_data)."""
    out: Dict[str, Callable] = {
        f: (lambda model, X, y, n, f=f: marglik_step(model, X, y, S, f, n)) for f in FLAVOURS
    }
    out[TRAIN_STEP] = lambda model, X, y, n: train_step(model, X, y, S)
    out[GGN_BACKWARD] = lambda model, X, y, n: ggn_backward_step(model, X, y, S)
    if with_peer:
        for approx in ("expand", "reduce"):
            out[f"marglik-noaug-{approx}"] = (
                # num_data = the batch, as laplace-torch uses len(dataset)
                lambda model, X, y, n, a=approx: marglik_step(model, X, y, 1, "reduce" if a == "reduce" else "mixed",
                                                              None, augment=False)
            )
            out[f"laplace-torch-curvlinops-{approx}"] = (lambda model, X, y, n, a=approx: peer_step(model, X, y, a, n))
    return out


# ------------------------------------------------------------------ memory
def _memory_child(spec, queue) -> None:
    name, S, batch, image, width, depth, device_name, threads, num_data = spec
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    device = torch.device(device_name)
    model = build_model(device, width, depth)
    X, y = build_data(batch, image, device)
    fn = contenders(S, with_peer=name.startswith(("marglik-noaug", "laplace-torch")))[name]
    try:
        queue.put(peak_extra_memory(lambda: fn(model, X, y, num_data), device))
    except Exception as err:  # reported, not hidden: the table shows the error
        queue.put(f"error: {type(err).__name__}: {err}")


def peak_memory(spec) -> Optional[int]:
    """Peak extra memory (bytes) of one step in a fresh process (CPU) or this device (CUDA)."""
    val = in_fresh_process(_memory_child, spec)
    if isinstance(val, str):
        print(f"  memory run {spec[0]}: {val}", flush=True)
        return None
    return int(val)


# ------------------------------------------------------------------ main
def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--copies", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="S values")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                    help="B values (default: 2 8 on CPU, 32 128 on CUDA)")
    ap.add_argument("--image", type=int, default=32)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per setting (default: 3 CUDA, 1 CPU)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the first (B, S) setting")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-data", type=int, default=50000, help="N the curvature represents (CIFAR-10: 50000)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke test: WRN-10-1 on 16x16, S in {1,2}, B=2 (unless --batch-sizes)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="", help="suffix of the result files, e.g. _cuda")
    ap.add_argument("--from-json", action="store_true",
                    help="only re-render <out>/wrn_cost<tag>.md from its JSON")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of <out>/wrn_cost<tag>.json for the batch sizes not measured now (a grid "
                         "measured in several sittings; each sitting's batch sizes and load are kept in the meta)")
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if pick_device(args.device).type == "cuda" else 1
    if args.quick:
        args.copies, args.image, args.width, args.depth = [1, 2], 16, 1, 10
        args.batch_sizes = args.batch_sizes or [2]
        args.repeats, args.warmup = 1, 0
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.from_json:
        return rerender(Path(args.out), f"wrn_cost{args.tag}", render)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = pick_device(args.device)
    if args.batch_sizes is None:
        args.batch_sizes = [32, 128] if device.type == "cuda" else [2, 8]
    model = build_model(device, args.width, args.depth)
    n_params = sum(p.numel() for p in model.parameters())
    name = f"WRN-{args.depth}-{args.width}"
    print(f"{name} ({n_params / 1e6:.2f}M params), {args.image}x{args.image}, device {device}", flush=True)

    load_before = os.getloadavg()[0]
    rows = []
    for batch in args.batch_sizes:
        X, y = build_data(batch, args.image, device)
        for S in args.copies:
            fns = contenders(S, with_peer=(S == 1))
            first = not rows  # lazy initialisation happens once per process: warm up before the first setting
            times = time_round_robin(fns, (model, X, y, args.num_data), args.repeats, args.warmup if first else 0,
                                     device)
            med = {k: statistics.median(v) for k, v in times.items()}
            for cname, t in med.items():
                mem = None
                if not args.no_memory:
                    mem = peak_memory((cname, S, batch, args.image, args.width, args.depth, str(device),
                                       args.threads, args.num_data))
                rows.append({"batch_size": batch, "copies": S, "contender": cname, "median_s": t,
                             "times_s": times[cname], "peak_extra_mib": None if mem is None else mem / 2**20})
                print(f"B={batch:4d} S={S:3d} {cname:34s} {t:8.3f} s  "
                      f"{'' if mem is None else f'{mem / 2**20:8.1f} MiB'}", flush=True)

    sitting = {"batch_sizes": list(args.batch_sizes), "threads": args.threads, "repeats": args.repeats,
               "load_average_1min": [load_before, os.getloadavg()[0]]}  # before / after (a shared machine)
    sittings = [sitting]
    stem = f"wrn_cost{args.tag}"
    if args.append and (Path(args.out) / f"{stem}.json").is_file():
        before = json.loads((Path(args.out) / f"{stem}.json").read_text())
        rows = [r for r in before["rows"] if r["batch_size"] not in args.batch_sizes] + rows
        m = before["meta"]
        sittings = m.get("sittings") or [{"batch_sizes": sorted({r["batch_size"] for r in before["rows"]}),
                                          "threads": m["threads"], "repeats": m["repeats"],
                                          "load_average_1min": m.get("load_average_1min")}]
        sittings = [st for st in sittings if not set(st["batch_sizes"]) <= set(args.batch_sizes)] + [sitting]
        rows.sort(key=lambda r: r["batch_size"])
    ratios = ratio_entries(rows)
    meta = {
        "model": f"{name} (norm='none'), {n_params} parameters",
        "image": f"3x{args.image}x{args.image}, random",
        "step": "augment (6 affine generators) -> KronLaplace.fit (type-2, differentiable) -> log marglik -> grad "
                "w.r.t. layerwise log prior and eta",
        "num_data": args.num_data,
        "device": str(device) if device.type != "cpu" else f"cpu ({platform.processor() or platform.machine()})",
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "quick": args.quick,
        "load_average_1min": sitting["load_average_1min"],  # this sitting's, before / after (a shared machine)
        "sittings": sittings,
    }
    payload = {"meta": meta, "rows": rows, "ratios": ratios}
    write_result(Path(args.out), stem, payload, render)
    return payload


def ratio_entries(rows: List[dict]) -> List[dict]:
    """Per (B, S) of ``rows``: the time ratios to reduce, reduce over the training step, each flavour's
    peak memory beyond the two references and, at S = 1, marglik over the peer."""

    def get(batch, S, cname, key):
        for r in rows:
            if (r["batch_size"], r["copies"], r["contender"]) == (batch, S, cname):
                return r[key]
        return None

    ratios = []
    for batch in dict.fromkeys(r["batch_size"] for r in rows):
        for S in dict.fromkeys(r["copies"] for r in rows if r["batch_size"] == batch):
            red = get(batch, S, "reduce", "median_s")
            entry = {"batch_size": batch, "copies": S,
                     "expand_over_reduce": get(batch, S, "expand", "median_s") / red,
                     "mixed_over_reduce": get(batch, S, "mixed", "median_s") / red,
                     "reduce_over_train_step": red / get(batch, S, TRAIN_STEP, "median_s")}
            act = get(batch, S, TRAIN_STEP, "peak_extra_mib")
            ggn = get(batch, S, GGN_BACKWARD, "peak_extra_mib")
            for f in FLAVOURS:  # memory beyond the activations (the training step on the same batch)
                mem = get(batch, S, f, "peak_extra_mib")
                entry[f"{f}_beyond_activations_mib"] = None if mem is None or act is None else mem - act
                entry[f"{f}_beyond_ggn_backward_mib"] = None if mem is None or ggn is None else mem - ggn
            if get(batch, S, "marglik-noaug-expand", "median_s") is not None:
                for a in ("expand", "reduce"):
                    ours = get(batch, S, f"marglik-noaug-{a}", "median_s")
                    peer = get(batch, S, f"laplace-torch-curvlinops-{a}", "median_s")
                    entry[f"marglik_over_peer_{a}"] = ours / peer
            ratios.append(entry)
    return ratios


def _beyond_table(ratios: List[dict], rows: List[dict], reference: str, key: str) -> List[str]:
    """Markdown rows: per (B, S) the ``reference`` contender's peak MiB and each flavour's excess over it."""
    lines = [f"| B | S | {reference} MiB | reduce | mixed | expand |", "|---:|---:|---:|---:|---:|---:|"]
    for r in ratios:
        ref = next((x["peak_extra_mib"] for x in rows
                    if (x["batch_size"], x["copies"], x["contender"]) == (r["batch_size"], r["copies"], reference)), None)
        vals = [r.get(f"{f}_beyond_{key}_mib") for f in ("reduce", "mixed", "expand")]
        lines.append(f"| {r['batch_size']} | {r['copies']} | {'-' if ref is None else f'{ref:.0f}'} | "
                     + " | ".join("-" if v is None else f"{v:+.0f}" for v in vals) + " |")
    return lines


def _loads(meta: dict) -> str:
    """The load averages (before / after) of the sittings that measured the rows."""
    sittings = meta.get("sittings")
    if not sittings:
        return " / ".join(f"{v:.1f}" for v in meta.get("load_average_1min", []))
    return "; ".join(f"B = {', '.join(map(str, st['batch_sizes']))}: "
                     + " / ".join(f"{v:.1f}" for v in st.get("load_average_1min") or [])
                     + f" ({st['threads']} threads)" for st in sittings)


def render(payload: dict) -> str:
    """The report, from the result JSON alone (the batch sizes and copies: those of its rows)."""
    batch_sizes = list(dict.fromkeys(r["batch_size"] for r in payload["rows"]))
    copies = list(dict.fromkeys(r["copies"] for r in payload["rows"]))
    meta, rows, ratios = payload["meta"], payload["rows"], payload["ratios"]

    def cell(batch, S, cname):
        for r in rows:
            if (r["batch_size"], r["copies"], r["contender"]) == (batch, S, cname):
                mem = "" if r["peak_extra_mib"] is None else f" / {r['peak_extra_mib']:.0f}"
                return f"{r['median_s']:.3f}{mem}"
        return ""

    lines = [
        f"# Cost of one marglik step vs augmented copies ({meta['model'].split(' ')[0]})",
        "",
        f"- model: {meta['model']}; images {meta['image']}; device {meta['device']}"
        + (f" ({meta['gpu']})" if meta["gpu"] else "") + f"; torch {meta['torch']}, {meta['threads']} threads",
        f"- one step: {meta['step']}",
        f"- median of {meta['repeats']} steps after {meta['warmup']} warm-up, round-robin over contenders in one "
        "process; memory: peak extra memory of one step in a fresh process (CPU: resident set size; CUDA: "
        "max_memory_allocated); 1-minute load average before / after: " + _loads(meta),
        "- flavours: expand = expand pixels and copies; mixed = expand pixels, reduce copies (LILA's expand arm); "
        "reduce = reduce both",
        "",
        "## Ratios (same process)",
        "",
        "| B | S | expand / reduce | mixed / reduce | reduce / training step |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in ratios:
        lines.append(f"| {r['batch_size']} | {r['copies']} | {r['expand_over_reduce']:.2f} | {r['mixed_over_reduce']:.2f} "
                     f"| {r['reduce_over_train_step']:.2f} |")
    if any(r.get("reduce_beyond_activations_mib") is not None for r in ratios):
        lines += ["", "## Memory beyond the activations", "",
                  f"Peak extra MiB of the marglik step minus that of a plain training step (`{TRAIN_STEP}`: augment, "
                  "forward, copy-averaged cross-entropy, backward to weights and eta) on the same B x S images. "
                  "Constant in S means the curvature adds nothing that grows with the copies:", ""]
        lines += _beyond_table(ratios, rows, TRAIN_STEP, "activations")
        lines += ["", f"The same minus the `{GGN_BACKWARD}` reference (the K = 10 class backward passes of a type-2 "
                  "GGN through the same forward pass, each keeping its graph for the gradient to eta, as a "
                  "differentiable fit must; no factors):", ""]
        lines += _beyond_table(ratios, rows, GGN_BACKWARD, "ggn_backward")
    peer = [r for r in ratios if "marglik_over_peer_expand" in r]
    if peer:
        lines += ["", "S = 1, no augmentation gradient: marglik / laplace-torch + curvlinops (`KronLaplace`, "
                  "`CurvlinopsGGN`), same step (fit + log marglik + prior gradient):", "",
                  "| B | expand | reduce |", "|---:|---:|---:|"]
        for r in peer:
            lines.append(f"| {r['batch_size']} | {r['marglik_over_peer_expand']:.2f} | {r['marglik_over_peer_reduce']:.2f} |")
    names = list(dict.fromkeys(r["contender"] for r in rows))
    lines += ["", "## Seconds / peak extra MiB per step", "", "| B | S | " + " | ".join(names) + " |",
              "|---:|---:|" + "---:|" * len(names)]
    for batch in dict.fromkeys(r["batch_size"] for r in rows):
        for S in dict.fromkeys(r["copies"] for r in rows):
            lines.append(f"| {batch} | {S} | " + " | ".join(cell(batch, S, n) for n in names) + " |")
    lines += ["", "Reproduce: `python scripts/bench_wrn_cost.py"
              + (f" --device {meta['device'].split(' ')[0]}" if not meta['device'].startswith('cpu') else "")
              + f" --batch-sizes {' '.join(map(str, batch_sizes))} --copies {' '.join(map(str, copies))}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
