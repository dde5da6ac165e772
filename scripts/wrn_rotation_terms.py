#!/usr/bin/env python
"""Why the K-FAC flavours learn different rotations: the terms of each flavour's log marginal
likelihood at one trained WRN-16-4 (``run_wrn_marglik.py``), as a function of the rotation range.

The Laplace log marginal likelihood of a model with learned augmentation is

    log p(D | theta, eta) - 0.5 (log det P - log det P_0) - 0.5 scatter,

where the first term (the data fit of the logits averaged over the S augmented copies) and the
scatter do not depend on the K-FAC flavour: at fixed weights and prior precisions only the log
determinant of the posterior precision does. So the rotation a flavour learns is set by how fast
its ``-0.5 log det`` term rises with the rotation (augmentation averages the copies' Jacobians,
which lowers the curvature) against how fast the data fit falls. This script holds one reported
model (weights, layerwise prior precisions) fixed, sets the rotation range to each value of
``--rotations``, fits every flavour on the same fixed selection images with the same augmentation
noise (``Selection.batches``) and records the three terms; no gradient. Two kinds of model:

* ``--run-dir``: the reported model (``checkpoints/best.ckpt``) of a finished run;
* ``--burn-in E``: the study's network trained E epochs by this script (the study's config, seed 0,
  no marglik update: prior precision 1, no augmentation), i.e. where the first marglik update of a
  run with E burn-in epochs starts, the point at which the flavours' paths part.

Writes ``results/wrn_rotation_terms.{json,md}`` (markdown rendered from the JSON alone)::

    python scripts/wrn_rotation_terms.py --burn-in 6 --run-dir outputs/wrn_marglik/aug-expand-reduce-s1 \
        outputs/wrn_marglik/aug-reduce-reduce-s1
    python scripts/wrn_rotation_terms.py --from-json
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import torch

from benchlib import RESULTS, fitted_at, write_result
from runner import read_json, repo_path

STEM = "wrn_rotation_terms"
FLAVOURS = ("expand-reduce", "reduce-reduce", "expand-expand")


def flavour_tuner(saved: Dict[str, Any], flavour: str, selection_size: int, device: str) -> Any:
    """A tuner with the saved run's config, K-FAC flavour ``flavour`` (``<pixels>-<copies>``) and the
    saved state (``model``, ``log_prior``, ``eta``, as in a ``best.ckpt``); nothing is trained or written."""
    from marglik.tuning import Config, MarglikTuner

    approx, copies = flavour.split("-")
    cfg = Config.from_dict(saved["config"], curvature={"approx": approx, "copies_approx": copies},
                           hyper={"selection": "subset", "selection_size": selection_size},
                           trainer={"resume": "never", "device": device}, logger={"mode": "disabled"})
    tuner = MarglikTuner(cfg, Path(tempfile.mkdtemp(prefix=f"wrn_terms_{flavour}_")))
    sel = tuner.parts.selection
    sel.best = {k: saved[k] for k in ("model", "log_prior", "eta")}
    sel.restore_best()
    return tuner


def burn_in_state(epochs: int, device: str) -> Dict[str, Any]:
    """The study's network (``wrn_protocol.job_config`` at its defaults, expand-reduce, seed 0) trained ``epochs``
    epochs without a marglik update: its weights, log prior precisions and eta (zero) and config."""
    from wrn_protocol import default_args, job_config

    from marglik.tuning import Config, MarglikTuner

    args = default_args()
    cfg = Config.from_dict(job_config(args, True, "expand", "reduce", 0),
                           trainer={"epochs": epochs, "resume": "never", "device": device},
                           hyper={"burn_in": epochs}, logger={"mode": "disabled"})
    tuner = MarglikTuner(cfg, Path(tempfile.mkdtemp(prefix="wrn_terms_burn_in_")))
    tuner.fit()
    sel = tuner.parts.selection
    return {"model": {k: v.detach().clone() for k, v in tuner.model.state_dict().items()},
            "log_prior": sel.prior.log_prior.detach().clone(), "eta": sel.augmenter.eta.detach().clone(),
            "config": cfg.to_dict()}


def terms_at(tuner: Any, rotation_deg: float) -> Dict[str, float]:
    """The log marglik terms (divided by N) at the rotation range ``rotation_deg`` (:func:`benchlib.fitted_at`)."""
    la, lml, seconds = fitted_at(tuner, rotation_deg)
    ll, ldr, sc = float(la.log_likelihood), float(la.log_det_ratio), float(la.scatter)
    N = tuner.N
    return {"rotation_deg": rotation_deg, "log_marglik": lml / N, "log_lik": ll / N, "half_log_det_ratio": 0.5 * ldr / N,
            "half_scatter": 0.5 * sc / N, "seconds": seconds}


def model_lines(m: Dict[str, Any]) -> List[str]:
    """The tables of one model: the terms per rotation and flavour, and their change from the
    smallest to the largest rotation."""
    fl = m["flavours"]
    lines = [f"## {m['label']}", "", m["about"], "",
             "| rotation (deg) | log lik | - 0.5 scatter | " + " | ".join(f"- 0.5 log det ratio ({f})" for f in fl)
             + " | " + " | ".join(f"log marglik ({f})" for f in fl) + " |",
             "|" + "---:|" * (3 + 2 * len(fl))]
    for i, r in enumerate(m["rotations"]):
        rows = [m["terms"][f][i] for f in fl]
        lines.append(f"| {r:g} | {rows[0]['log_lik']:.4f} | {-rows[0]['half_scatter']:.4f} | "
                     + " | ".join(f"{-t['half_log_det_ratio']:.4f}" for t in rows) + " | "
                     + " | ".join(f"{t['log_marglik']:.4f}" for t in rows) + " |")
    lines += ["", "| flavour | change of the data fit | change of - 0.5 log det | change of log marglik | "
              "preferred rotation (deg, of these) |", "|---|---:|---:|---:|---:|"]
    for f in fl:
        ts = m["terms"][f]
        best = max(ts, key=lambda t: t["log_marglik"])["rotation_deg"]
        lines.append(f"| {f} | {ts[-1]['log_lik'] - ts[0]['log_lik']:+.4f} | "
                     f"{-(ts[-1]['half_log_det_ratio'] - ts[0]['half_log_det_ratio']):+.4f} | "
                     f"{ts[-1]['log_marglik'] - ts[0]['log_marglik']:+.4f} | {best:g} |")
    return lines + [""]


def render(res: Dict[str, Any]) -> str:
    m = res["meta"]
    lines = ["# Log marglik terms against the rotation range, at fixed WRN-16-4 weights", "",
             f"Generated by `{m['command']}`. For every model its weights and layerwise prior precisions are held "
             f"fixed; for every rotation range the same {m['selection_size']} selection images with the same "
             f"augmentation noise (S = {m['n_samples']} copies), N = {m['N']}; all values / N, changes from "
             f"{res['models'][0]['rotations'][0]:g} to {res['models'][0]['rotations'][-1]:g} degrees. The data fit "
             "and the scatter do not depend on the K-FAC flavour; `- 0.5 log det` does, and its rise with the "
             "rotation (the logits averaged over copies have smaller Jacobians) against the data fit sets the "
             "rotation a flavour prefers.", ""]
    for model in res["models"]:
        lines += model_lines(model)
    if res.get("reading"):
        lines += ["## Reading", "", res["reading"].strip(), ""]
    return "\n".join(lines)


def model_terms(label: str, about: str, saved: Dict[str, Any], args) -> Dict[str, Any]:
    """Every flavour's terms at every rotation of ``args.rotations`` for one saved state."""
    rotations = sorted(args.rotations)
    terms: Dict[str, List[Dict[str, float]]] = {}
    for f in args.flavours:
        tuner = flavour_tuner(saved, f, args.selection_size, args.device)
        terms[f] = []
        for r in rotations:
            terms[f].append(terms_at(tuner, r))
            t = terms[f][-1]
            print(f"{label}: {f} rot {r:5.1f}: lml/N {t['log_marglik']:.4f} loglik/N {t['log_lik']:.4f} "
                  f"0.5 logdet/N {t['half_log_det_ratio']:.4f} ({t['seconds']:.0f} s)", flush=True)
    return {"label": label, "about": about, "N": tuner.N, "flavours": list(args.flavours), "rotations": rotations,
            "terms": terms}


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", nargs="*", default=["outputs/wrn_marglik/aug-expand-reduce-s1"],
                    help="learned-augmentation runs of run_wrn_marglik.py (their checkpoints/best.ckpt)")
    ap.add_argument("--burn-in", type=int, default=None, help="also the network after this many MAP epochs")
    ap.add_argument("--rotations", type=float, nargs="+", default=[0.0, 30.0, 60.0, 90.0])
    ap.add_argument("--flavours", nargs="+", default=list(FLAVOURS), choices=FLAVOURS)
    ap.add_argument("--selection-size", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--from-json", action="store_true", help="only re-render <out>/wrn_rotation_terms.md")
    ap.add_argument("--reading", default=None, help="a text file with the reading, stored in the JSON and rendered")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not args.from_json:
        if not args.run_dir and not args.burn_in:
            ap.error("nothing to evaluate: give --run-dir and/or --burn-in")
        from marglik.tuning import checkpoint as ckpt

        missing = [d for d in args.run_dir if not (Path(d) / "checkpoints" / ckpt.BEST).is_file()]
        if missing:
            ap.error(f"--run-dir: no checkpoints/{ckpt.BEST} in {', '.join(missing)} (a finished learned-augmentation "
                     "run of run_wrn_marglik.py)")
    if args.from_json:
        res = read_json(out, STEM)
        if args.reading:
            res["reading"] = Path(args.reading).read_text()
        write_result(out, STEM, res, render)
        return 0
    torch.set_num_threads(1)
    models = []
    if args.burn_in:
        state = burn_in_state(args.burn_in, args.device)
        models.append(model_terms(
            f"After {args.burn_in} epochs of MAP training (where the first marglik update starts)",
            f"The study's network and data (seed 0), trained {args.burn_in} epochs without augmentation, prior "
            "precision 1: the state every learned-augmentation run reaches before its first update.", state, args))
    for run_dir in args.run_dir:
        saved = ckpt.load(Path(run_dir) / "checkpoints" / ckpt.BEST, required=())
        rot = abs(math.degrees(float(saved["eta"].reshape(-1)[0])))
        models.append(model_terms(
            f"The reported model of {Path(run_dir).name}", f"`{repo_path(run_dir)}` (best selection value, epoch "
            f"{saved['epoch']}): learned rotation {rot:.1f} degrees, its prior precisions.", saved, args))
    cfg = (saved if args.run_dir else state)["config"]
    command = "python scripts/wrn_rotation_terms.py" + (f" --burn-in {args.burn_in}" if args.burn_in else "") + \
        (" --run-dir " + " ".join(repo_path(d) for d in args.run_dir) if args.run_dir else "")
    res = {"meta": {"selection_size": args.selection_size, "n_samples": cfg["hyper"]["n_samples"], "N": models[0]["N"],
                    "command": command}, "models": models}
    write_result(out, STEM, res, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
