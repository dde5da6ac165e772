#!/usr/bin/env python
"""Why K-FAC-reduce learns less invariance than expand, per layer, and what a per-layer flavour costs.

Three parts, each merged into ``results/reduce_invariance.json`` (the markdown is rendered from the
JSON alone; the derivation is in :mod:`marglik.curvature.flavours`):

* ``--part terms --model cnn|wrn``: at fixed weights (the network MAP-trained ``--epochs`` epochs
  on the rotated digits without a marglik update, prior precision 1: where the first update of a
  run starts) and for every rotation range of ``--rotations``, each flavour's ``-0.5 log det``
  ratio per covered block (the posterior precision is block diagonal, so a block's term depends
  on its own flavour alone), and the traces of its factors ``A`` and ``B``, on the same
  ``--selection-size`` selection images with the same augmentation noise;
* ``--part cost --model cnn|wrn``: the hypersteps of one marglik update per flavour in one process
  on the same weights (:func:`benchlib.time_hypersteps`, one thread);
* ``--part learn``: one shortened digits-CNN run per flavour (``--learn-epochs``, ``--learn-samples``)
  at ``data.rotation=90``: the learned rotation and its CPU seconds.

    python scripts/reduce_invariance.py --part terms --model cnn
    python scripts/reduce_invariance.py --from-json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from benchlib import RESULTS, V0_PROTOCOL, fitted_at, time_hypersteps, write_result
from runner import read_json

STEM = "reduce_invariance"
#: flavour label -> (curvature.approx, curvature.copies_approx, curvature.approx_layers)
FLAVOURS = {"expand-reduce": ("expand", "reduce", {}), "reduce-reduce": ("reduce", "reduce", {}),
            "auto-reduce": ("auto", "reduce", {}),
            "auto-reduce, block3 reduce": ("auto", "reduce", {"block3": "reduce"}),
            "reduce-reduce, conv1+block1 expand": ("reduce", "reduce", {"conv1": "expand", "block1": "expand"}),
            "reduce-reduce, block2 expand": ("reduce", "reduce", {"block2": "expand"}),
            "reduce-reduce, features.0 expand": ("reduce", "reduce", {"features.0": "expand"}),
            "reduce-reduce, features.3 expand": ("reduce", "reduce", {"features.3": "expand"})}


def job(model: str, rotation: float, flavour: str, epochs: int, seed: int = 0) -> Dict[str, Any]:
    """The config dict of a run: the WRN study's protocol (``wrn_protocol.job_config``) or the default job
    under :data:`benchlib.V0_PROTOCOL` with ``model=cnn``, ``epochs`` epochs (all burn-in when ``epochs`` is the burn-in); K-FAC ``flavour``."""
    approx, copies, layers = FLAVOURS[flavour]
    if model == "wrn":
        from wrn_protocol import default_args, job_config

        cfg = job_config(default_args(), True, approx, copies, seed)
        cfg["data"]["rotation"] = rotation
        cfg["trainer"]["epochs"] = epochs
        cfg["curvature"]["approx_layers"] = dict(layers)
        cfg["logger"] = {"mode": "disabled"}
        return cfg
    # the default job under the protocol its committed results were made with (benchlib.V0_PROTOCOL), not
    # today's defaults
    return {"data": {"name": "digits", "rotation": rotation}, "model": {"name": "cnn"},
            "curvature": {**V0_PROTOCOL["curvature"], "approx": approx, "copies_approx": copies,
                          "approx_layers": dict(layers)},
            "hyper": {**V0_PROTOCOL["hyper"], "selection": "subset"},
            "trainer": {"epochs": epochs, "seed": seed, "device": "cpu", "num_threads": 1, "progress": False,
                        "eval_every": 0},
            "logger": {"mode": "disabled"}}


def tuner_of(cfg: Dict[str, Any], **over: Any) -> Any:
    from marglik.tuning import Config, MarglikTuner

    over.setdefault("trainer", {}).update({"resume": "never"})
    c = Config.from_dict(cfg, **over)
    return MarglikTuner(c, Path(tempfile.mkdtemp(prefix="reduce_invariance_")))


def trained_state(model: str, epochs: int) -> Dict[str, Any]:
    """The network MAP-trained ``epochs`` epochs on digits rotated by up to 90 degrees, no marglik update
    (cached under the temporary directory: the training is deterministic given the seed)."""
    cache = Path(tempfile.gettempdir()) / f"reduce_invariance_{model}_{epochs}.pt"
    if cache.is_file():
        return torch.load(cache)
    t = tuner_of(job(model, 90.0, "expand-reduce", epochs), hyper={"burn_in": epochs})
    t0 = time.perf_counter()
    t.fit()
    sel = t.parts.selection
    state = {"model": {k: v.detach().clone() for k, v in t.model.state_dict().items()},
             "log_prior": sel.prior.log_prior.detach().clone(), "eta": sel.augmenter.eta.detach().clone(),
             "seconds": time.perf_counter() - t0}
    torch.save(state, cache)
    return state


def flavour_tuner(model: str, state: Dict[str, Any], flavour: str, selection_size: int) -> Any:
    t = tuner_of(job(model, 90.0, flavour, 1), hyper={"selection": "subset", "selection_size": selection_size})
    sel = t.parts.selection
    sel.best = {k: state[k] for k in ("model", "log_prior", "eta")}
    sel.restore_best()
    return t


def block_terms(la: Any, N: int) -> Dict[str, Dict[str, float]]:
    """Per covered block: ``-0.5 log det ratio / N`` and the traces of ``A`` and ``B`` (Kronecker blocks)."""
    from marglik import KronBlock

    post = la.posterior
    prior = la.prior_precision
    blocks = post.posterior_blocks(prior, post.structure(prior))
    infos = list(post.kron_blocks) + list(post.diag_blocks)
    out: Dict[str, Dict[str, float]] = {}
    for info, blk in zip(infos, blocks):
        b = info.block
        row = {"half_neg_logdet": -0.5 * float(blk.logdet_ratio(la._H_factor)) / N}
        if isinstance(b, KronBlock):
            row["trace_A"] = float(torch.diagonal(b.A, dim1=-2, dim2=-1).sum())
            row["trace_B"] = float(torch.diagonal(b.B, dim1=-2, dim2=-1).sum())
        out[b.name] = row
    return out


def terms_part(args) -> Dict[str, Any]:
    torch.set_num_threads(1)
    state = trained_state(args.model, args.epochs)
    res: Dict[str, Any] = {"epochs": args.epochs, "train_seconds": state["seconds"],
                           "selection_size": args.selection_size, "rotations": sorted(args.rotations), "flavours": {}}
    for f in args.flavours:
        t = flavour_tuner(args.model, state, f, args.selection_size)
        sel = t.parts.selection
        res["flavour_assignment_" + f] = assignment_of(sel)
        rows = []
        for r in res["rotations"]:
            la, lml, seconds = fitted_at(t, r)
            t0 = time.perf_counter()  # the row's seconds include its per-block terms, as they always did
            with torch.no_grad():
                rows.append({"rotation_deg": r, "log_marglik": lml / t.N, "log_lik": float(la.log_likelihood) / t.N,
                             "half_neg_logdet": -0.5 * float(la.log_det_ratio) / t.N,
                             "blocks": block_terms(la, t.N), "seconds": seconds + time.perf_counter() - t0})
            print(f"{args.model} {f} rot {r:g}: -0.5 logdet/N {rows[-1]['half_neg_logdet']:.4f} "
                  f"({rows[-1]['seconds']:.1f} s)", flush=True)
        res["flavours"][f] = rows
        res["N"] = t.N
    return res


def assignment_of(sel: Any) -> Dict[str, str]:
    """The flavour each covered block got (``KFAC.flavours``), where the engine reports it."""
    la = sel.laplace.factory(sel.model, 1.0, False) if hasattr(sel.laplace, "factory") else None
    kfac = getattr(la, "kfac", None)
    fl = getattr(kfac, "flavours", None)
    return {k: str(v) for k, v in fl.items()} if fl else {}


def cost_part(args) -> Dict[str, Any]:
    torch.set_num_threads(1)
    tuners, state = {}, None
    for f in args.flavours:
        t = tuner_of(job(args.model, 90.0, f, 1), hyper={"selection_size": 8, "steps": args.steps})
        state = t.model.state_dict() if state is None else state
        t.model.load_state_dict(state)
        tuners[f] = t
    res = time_hypersteps(tuners, args.repeats, 45.0)
    h = tuners[args.flavours[0]].cfg.hyper
    res.update({"n_samples": h.n_samples, "marglik_batch_size": h.marglik_batch_size,
                "marglik_batches": h.marglik_batches, "steps": h.steps})
    return res


def learn_part(args) -> Dict[str, Any]:
    out = {}
    for f in args.flavours:
        cfg = job("cnn", 90.0, f, args.learn_epochs, seed=args.learn_seed)
        t = tuner_of(cfg, hyper={"n_samples": args.learn_samples, "selection": "full"})
        t0, c0 = time.perf_counter(), time.process_time()
        summary = t.fit()
        rot = float(summary["augmentation"]["rotation"])  # the reported (best-marglik) model's range, degrees
        out[f"{f}, {args.learn_epochs} epochs, S={args.learn_samples}, seed {args.learn_seed}"] = {
            "flavour": f, "seed": args.learn_seed, "learned_rotation_deg": rot, "test_accuracy": summary["test_accuracy"],
                  "wall_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                  "epochs": args.learn_epochs, "n_samples": args.learn_samples}
        print(f"learn {f}: rotation {rot:.1f} deg, {time.process_time() - c0:.0f} CPU s", flush=True)
    return out


# ------------------------------------------------------------------ rendering (from the JSON alone)
def terms_lines(name: str, m: Dict[str, Any]) -> List[str]:
    fl = list(m["flavours"])
    pure = [f for f in fl if f in ("expand-reduce", "reduce-reduce")]  # the factors' traces of the two flavours
    rots = m["rotations"]
    lo, hi = rots[0], rots[-1]
    lines = [f"## {name}: `-0.5 log det` ratio per block (nats / example)", "",
             f"MAP-trained {m['epochs']} epochs on the rotated digits (no marglik update, prior precision 1), "
             f"{m['selection_size']} selection images, N = {m['N']}. Columns: the change of each block's term "
             f"from {lo:g} to {hi:g} degrees (its reward for the range) per flavour, and the ratio of its factors' "
             f"traces at {hi:g} to {lo:g} degrees.", "",
             "| block | " + " | ".join(f"reward {f}" for f in fl) + " | "
             + " | ".join(f"tr A / tr A0 ({f})" for f in pure) + " | "
             + " | ".join(f"tr B / tr B0 ({f})" for f in pure) + " |",
             "|---|" + "---:|" * (len(fl) + 2 * len(pure))]
    names = list(m["flavours"][fl[0]][0]["blocks"])

    def reward(f: str, b: str) -> float:
        rows = m["flavours"][f]
        return rows[-1]["blocks"][b]["half_neg_logdet"] - rows[0]["blocks"][b]["half_neg_logdet"]

    small = [b for b in names if all(abs(reward(f, b)) < 5e-4 for f in fl)
             and "trace_A" not in m["flavours"][fl[0]][0]["blocks"][b]]
    for b in names:
        if b in small:
            continue
        cells = [f"{reward(f, b):+.3f}" for f in fl]
        for key in ("trace_A", "trace_B"):
            for f in pure:
                rows = m["flavours"][f]
                a0, a1 = rows[0]["blocks"][b].get(key), rows[-1]["blocks"][b].get(key)
                cells.append(f"{a1 / a0:.3f}" if a0 else "-")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    groups: Dict[str, List[str]] = {}
    for b in names:
        groups.setdefault(b.split(".")[0], []).append(b)
    if len(groups) < len(names):
        for g, members in groups.items():
            if all(b in small for b in members):
                continue
            lines.append(f"| *{g} (sum)* | " + " | ".join(f"*{sum(reward(f, b) for b in members):+.3f}*" for f in fl)
                         + " |" + " |" * (2 * len(pure)))
    tot = [m["flavours"][f][-1]["half_neg_logdet"] - m["flavours"][f][0]["half_neg_logdet"] for f in fl]
    lines.append("| **all** | " + " | ".join(f"**{t:+.3f}**" for t in tot) + " |" + " |" * (2 * len(pure)))
    if small:
        lines += ["", f"Not shown: {len(small)} diagonal blocks (norm / Fixup scalars, exact under every flavour) "
                  "with rewards below 0.0005 each (in the sums)."]
    lines += ["", "Whole-network terms per rotation (`-0.5 log det` ratio / log lik, nats / example):", "",
              "| rotation | log lik | " + " | ".join(f"-0.5 log det ({f})" for f in fl) + " | "
              + " | ".join(f"log marglik ({f})" for f in fl) + " |", "|---:|---:|" + "---:|" * (2 * len(fl))]
    for i, r in enumerate(rots):
        rows = [m["flavours"][f][i] for f in fl]
        lines.append(f"| {r:g} | {rows[0]['log_lik']:.4f} | " + " | ".join(f"{t['half_neg_logdet']:.4f}" for t in rows)
                     + " | " + " | ".join(f"{t['log_marglik']:.4f}" for t in rows) + " |")
    for f in fl:
        a = m.get("flavour_assignment_" + f)
        if a and f.startswith("auto"):
            ex = [k for k, v in a.items() if v == "expand"]
            lines += ["", f"`{f}` assigns expand to: {', '.join(f'`{k}`' for k in ex) or 'none'}; reduce to the "
                      f"other {len(a) - len(ex)} blocks."]
    return lines + [""]


def cost_lines(name: str, c: Dict[str, Any]) -> List[str]:
    lines = [f"## {name}: hyperstep seconds (one marglik update, {c['steps']} hypersteps, {c['marglik_batches']} "
             f"batches of {c['marglik_batch_size']} images x S = {c['n_samples']} copies; {c['repeats']} rounds, "
             "flavours interleaved, one thread)", "",
             "| flavour | median s | min s | median / expand-reduce | median / reduce-reduce |",
             "|---|---:|---:|---:|---:|"]
    med = c["median_seconds"]
    er = med.get("expand-reduce")
    for f, v in med.items():
        lines.append(f"| {f} | {v:.2f} | {c['min_seconds'][f]:.2f} | {v / er:.2f} | "
                     f"{c['ratio_to_reduce_reduce'][f]:.2f} |" if er else f"| {f} | {v:.2f} | | | |")
    return lines + [""]


def render(res: Dict[str, Any]) -> str:
    lines = ["# K-FAC-reduce and learned invariance: the log-det reward per layer, and a per-layer flavour", "",
             "Generated by `python scripts/reduce_invariance.py` (parts `terms`, `cost`, `learn`; CPU, one torch "
             "thread, a 2-core machine shared with other jobs). The derivation is the docstring of "
             "`marglik/curvature/flavours.py`. Flavours: `<curvature.approx>-<curvature.copies_approx>`.", ""]
    labels = {"cnn": "Digits CNN (SmallCNN, the default job)", "wrn": "WRN-16-4 (the study's protocol)"}
    for key in ("cnn", "wrn"):
        if key in res.get("terms", {}):
            lines += terms_lines(labels[key], res["terms"][key])
    for key in ("cnn", "wrn"):
        if key in res.get("cost", {}):
            lines += cost_lines(labels[key], res["cost"][key])
    if res.get("learn"):
        lines += ["## Digits CNN at data.rotation=90 (the default job otherwise: all six generators learned)", "",
                  "| flavour | seed | epochs | S | learned rotation (deg) | test accuracy | CPU s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in res["learn"].values():
            lines.append(f"| {r['flavour']} | {r['seed']} | {r['epochs']} | {r['n_samples']} | "
                         f"{r['learned_rotation_deg']:.1f} | "
                         f"{r['test_accuracy']:.4f} | {r['cpu_seconds']:.0f} |")
        lines.append("")
    if res.get("reading"):
        lines += ["## Reading", "", res["reading"].strip(), ""]
    return "\n".join(lines)


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("terms", "cost", "learn"))
    ap.add_argument("--model", choices=("cnn", "wrn"), default="cnn")
    ap.add_argument("--flavours", nargs="+", default=list(FLAVOURS), choices=list(FLAVOURS))
    ap.add_argument("--epochs", type=int, default=5, help="MAP epochs before the terms")
    ap.add_argument("--rotations", type=float, nargs="+", default=[0.0, 45.0, 90.0])
    ap.add_argument("--selection-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1, help="hypersteps per timed update (cost)")
    ap.add_argument("--learn-epochs", type=int, default=20)
    ap.add_argument("--learn-samples", type=int, default=4)
    ap.add_argument("--learn-seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--from-json", action="store_true", help="only re-render the markdown")
    ap.add_argument("--reading", default=None, help="a text file with the reading, stored in the JSON")
    args = ap.parse_args(argv)
    out = Path(args.out)
    res = read_json(out, STEM) if (out / f"{STEM}.json").is_file() else {}
    if args.reading:
        res["reading"] = Path(args.reading).read_text()
    if args.part == "terms":
        new = terms_part(args)
        old = res.setdefault("terms", {}).get(args.model)
        if old and old["rotations"] == new["rotations"] and old["selection_size"] == new["selection_size"] \
                and old["epochs"] == new["epochs"]:  # the same fixed weights and data: add these flavours
            new["flavours"] = {**old["flavours"], **new["flavours"]}
            new = {**old, **new}
        res["terms"][args.model] = new
    elif args.part == "cost":
        res.setdefault("cost", {})[args.model] = cost_part(args)
    elif args.part == "learn":
        res["learn"] = {**res.get("learn", {}), **learn_part(args)}
    elif not args.from_json and not args.reading:
        ap.error("give --part, --from-json or --reading")
    write_result(out, STEM, res, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
