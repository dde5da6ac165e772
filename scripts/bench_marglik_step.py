"""One marginal-likelihood step on WRN-16-4: marglik against laplace-torch + curvlinops, with its
breakdown and its floor.

A *step* is what the tuning loop does per hyperstep (:mod:`wrn_steps`): ``KronLaplace.fit`` on ``n``
images in batches, the log marginal likelihood at a layerwise prior and its gradient w.r.t. the log
prior precisions (type-2 GGN); with learned augmentation the ``n`` images are first augmented into
``S`` copies, the fit is differentiable and the gradient also goes to the augmentation ranges ``eta``.

Contenders, timed round-robin in one process (machine load hits all alike), medians of ``--repeats``:

* ``marglik-<flavour>``: marglik's step with rank-bounded factors (``factor_form="auto"``: factors from
  at most half their dimension in rows are decomposed through their rows);
  ``marglik-<flavour>-dense``: the same with every factor dense (the peers' path; the ablation);
* ``laplace-torch-<approx>`` (no augmentation only): laplace-torch's ``KronLaplace`` with its
  ``CurvlinopsGGN`` backend (``kfac_approx`` expand / reduce), the same data in the same batches;
* ``floor``: the forward pass and the ``K = C - 1`` backward passes to the covered layers' outputs
  that a type-2 fit cannot avoid (with their graphs and the gradient through them to ``eta`` when
  augmenting), no factors (:func:`wrn_steps.floor_step`).

Breakdown of a marglik step (from the same rounds): forward and backward passes (the floor's), the
decomposition of the factors (:class:`marglik.DecomposedKron`, timed again on the fitted factors),
the log determinant and its gradient (with augmentation: including the backward through the fit's
graph to ``eta``), and the factor products and bookkeeping (the rest of the fit).

Usage::

    python scripts/bench_marglik_step.py                     # CPU grid -> results/marglik_step_wrn.{md,json}
    python scripts/bench_marglik_step.py --device cuda --tag _cuda
    python scripts/bench_marglik_step.py --quick --out /tmp/x  # smoke test (tiny WRN)
    python scripts/bench_marglik_step.py --from-json         # re-render the markdown from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from benchlib import RESULTS, pick_device, sync
from wrn_steps import build_data, build_model, floor_step, marglik_step, peer_step

STEM = "marglik_step_wrn"
GRID_SIZES = (32, 128, 1000)  # n of the default grid, with and without augmentation
GRID_COPIES = (1, 2, 8)  # S of the default grid
#: augmentation flavours: pixels-copies (wrn_steps.FLAVOURS: reduce = reduce-reduce, mixed = expand-reduce)
AUG_FLAVOURS = {"reduce-reduce": "reduce", "expand-reduce": "mixed", "expand-expand": "expand"}
NOAUG_FLAVOURS = {"reduce": "reduce", "expand": "mixed"}  # without copies mixed = expand


def contenders(augment: bool, S: int, batch: int, num_data: int) -> Dict[str, Callable[[dict], float]]:
    """name -> fn(model, X, y, timer) for one setting."""
    out: Dict[str, Callable] = {}
    flavours = AUG_FLAVOURS if augment else NOAUG_FLAVOURS
    for name, fl in flavours.items():
        # the dense ablation where rows can matter: both flavours without augmentation, reduce-reduce with
        forms = ("auto", "dense") if (not augment or name == "reduce-reduce") else ("auto",)
        for form in forms:
            label = f"marglik-{name}" + ("-dense" if form == "dense" else "")
            out[label] = (lambda model, X, y, timer, fl=fl, form=form:
                          marglik_step(model, X, y, S, fl, num_data, augment=augment, batch_size=batch,
                                       factor_form=form, timer=timer))
    if not augment:
        for a in ("reduce", "expand"):
            out[f"laplace-torch-{a}"] = (lambda model, X, y, timer, a=a:
                                         peer_step(model, X, y, a, num_data, batch_size=batch))
    out["floor"] = lambda model, X, y, timer: floor_step(model, X, y, S, augment=augment, batch_size=batch,
                                                          timer=timer)
    return out


def time_setting(fns: Dict[str, Callable], model, X, y, repeats: int, warmup: int, device) -> Dict[str, dict]:
    """Round-robin over the contenders; per contender the step seconds of every repeat and the median
    of each timer entry."""
    for _ in range(warmup):
        for fn in fns.values():
            fn(model, X, y, {})
    res = {k: {"times_s": [], "timers": []} for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            timer: Dict[str, float] = {}
            sync(device)
            t = time.perf_counter()
            fn(model, X, y, timer)
            sync(device)
            wall = time.perf_counter() - t
            # a marglik step's own time excludes the decomposition it re-times for the breakdown
            step = timer["fit"] + timer["logdet_grad"] if "fit" in timer else wall
            res[name]["times_s"].append(step)
            res[name]["timers"].append(timer)
    for r in res.values():
        r["median_s"] = statistics.median(r["times_s"])
        keys = r["timers"][0].keys() if r["timers"] else []
        r["timer"] = {k: statistics.median(t[k] for t in r["timers"]) for k in keys}
        del r["timers"]
    return res


def breakdown(res: Dict[str, dict], name: str) -> Optional[dict]:
    """The breakdown of marglik contender ``name`` (see the module docstring)."""
    t, fl = res[name].get("timer", {}), res["floor"]["timer"]
    if "fit" not in t:
        return None
    products = t["fit"] - t["decompose"] - fl["forward"] - fl["backward"]
    return {"forward": fl["forward"], "backward_passes": fl["backward"], "factor_products": products,
            "decomposition": t["decompose"], "logdet_and_gradient": t["logdet_grad"],
            "row_factors": t.get("row_factors"), "factors": t.get("factors")}


def accuracy(model, X, y, batch: int, num_data: int, priors=(1e-3, 1.0, 100.0)) -> List[dict]:
    """float32 against float64: the log marglik and its prior gradient of K-FAC-reduce on ``X`` with
    rows (``factor_form="auto"``) and dense factors, relative to the float64 dense value, at a few
    layerwise prior precisions. A float32 ``eigh`` of a dense factor of rank ``m < d`` returns round-off
    eigenvalues (~1e-7 of the largest) on the null space instead of 0; against a weak prior they add
    spurious log det terms. The rows path has no null-space eigenvalues to get wrong."""
    import copy

    import marglik

    L = sum(1 for _ in model.parameters())
    values = {}
    for dtype in (torch.float32, torch.float64):
        m = copy.deepcopy(model).to(dtype)
        Xd = X.to(dtype)
        for form in ("auto", "dense"):
            la = marglik.KronLaplace(m, "classification", approx="reduce", factor_form=form)
            la.fit([(Xd[i: i + batch], y[i: i + batch]) for i in range(0, len(y), batch)], num_data=num_data)
            for delta in priors:
                p = torch.full((L,), delta, dtype=dtype, device=X.device, requires_grad=True)
                lml = la.log_marginal_likelihood(p)
                (g,) = torch.autograd.grad(lml, [p])
                values[(dtype, form, delta)] = (lml.detach().double(), g.double())
    out = []
    for delta in priors:
        ref_l, ref_g = values[(torch.float64, "dense", delta)]
        row = {"prior_precision": delta}
        for form in ("auto", "dense"):
            lml, g = values[(torch.float32, form, delta)]
            row[f"{form}_lml_rel_err"] = float((lml - ref_l).abs() / ref_l.abs())
            row[f"{form}_grad_rel_err"] = float((g - ref_g).norm() / ref_g.norm())
        row["float64_rows_vs_dense_lml_rel"] = float((values[(torch.float64, "auto", delta)][0] - ref_l).abs() / ref_l.abs())
        out.append(row)
    return out


def ratios(setting: dict) -> dict:
    res = setting["results"]
    med = {k: v["median_s"] for k, v in res.items()}
    out = {f"{k}/floor": v / med["floor"] for k, v in med.items() if k.startswith("marglik-")}
    if setting["augment"]:
        out["reduce-reduce/expand-reduce"] = med["marglik-reduce-reduce"] / med["marglik-expand-reduce"]
        out["reduce-reduce/expand-expand"] = med["marglik-reduce-reduce"] / med["marglik-expand-expand"]
        out["rows speed-up reduce-reduce (dense/auto)"] = med["marglik-reduce-reduce-dense"] / med["marglik-reduce-reduce"]
    else:
        out["reduce/laplace-torch reduce"] = med["marglik-reduce"] / med["laplace-torch-reduce"]
        out["expand/laplace-torch expand"] = med["marglik-expand"] / med["laplace-torch-expand"]
        out["reduce/expand"] = med["marglik-reduce"] / med["marglik-expand"]
        out["rows speed-up reduce (dense/auto)"] = med["marglik-reduce-dense"] / med["marglik-reduce"]
    return out


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(GRID_SIZES), help="n without augmentation")
    ap.add_argument("--aug-sizes", type=int, nargs="+", default=None,
                    help="n with augmentation (on a CPU 128 x 8 and 1000 x S are skipped unless --all)")
    ap.add_argument("--copies", type=int, nargs="+", default=list(GRID_COPIES), help="S with augmentation")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds for n <= 32 (larger n: --repeats-large)")
    ap.add_argument("--repeats-large", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the first setting")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--num-data", type=int, default=50000, help="N the curvature represents (CIFAR-10: 50000)")
    ap.add_argument("--image", type=int, default=32)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--all", action="store_true", help="on a CPU too, the augmented settings left to a GPU")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the float32-against-float64 comparison")
    ap.add_argument("--quick", action="store_true", help="smoke test: WRN-10-1 on 16x16, n in {4}, S in {1, 2}")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="", help="suffix of the result files, e.g. _cuda")
    ap.add_argument("--from-json", action="store_true", help="only re-render <out>/marglik_step_wrn<tag>.md")
    ap.add_argument("--note", default=None, help="with --from-json: a note on how the numbers were taken, kept "
                    "in the JSON's meta and rendered under the tables")
    ap.add_argument("--append", action="store_true",
                    help="keep the settings already in <out>/marglik_step_wrn<tag>.json and run only the missing ones "
                         "(a grid measured in several sittings; each setting's contenders still share one process)")
    args = ap.parse_args(argv)
    cuda = pick_device(args.device).type == "cuda"
    if args.aug_sizes is None:
        args.aug_sizes = list(GRID_SIZES)
    # on a CPU the differentiable fits of 128 x 8 and 1000 x S augmented images take hours per setting:
    # they are the GPU run's (scripts/device_check.sh)
    args.skip = set() if (cuda or args.all) else {(128, 8), (1000, 1), (1000, 2), (1000, 8)}
    if args.quick:
        args.sizes, args.aug_sizes, args.copies = [4], [4], [1, 2]
        args.image, args.width, args.depth, args.repeats, args.warmup = 16, 1, 10, 1, 0
    return args


def fit_batch(n: int) -> int:
    """Images per fit batch: 16 up to n = 32 (the tuning loop's CPU setting, 2 x 16), n / 2 up to 128,
    else 250 (``+experiment=cifar10_wrn16_4``: 4 x 250)."""
    return min(n, 16) if n <= 32 else (n // 2 if n <= 128 else 250)


def main(argv=None) -> dict:
    args = parse(argv)
    out = Path(args.out)
    if args.from_json:
        payload = json.loads((out / f"{STEM}{args.tag}.json").read_text())
        if args.note is not None:
            payload["meta"]["note"] = args.note
            (out / f"{STEM}{args.tag}.json").write_text(json.dumps(payload, indent=2))
        (out / f"{STEM}{args.tag}.md").write_text(render(payload))
        return payload
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = pick_device(args.device)
    model = build_model(device, args.width, args.depth)
    n_params = sum(p.numel() for p in model.parameters())
    name = f"WRN-{args.depth}-{args.width}"
    print(f"{name} ({n_params / 1e6:.2f}M params), {args.image}x{args.image}, device {device}", flush=True)
    load_before = os.getloadavg()[0]
    grid = [(False, n, 1) for n in args.sizes] + [(True, n, S) for n in args.aug_sizes for S in args.copies
                                                 if (n, S) not in args.skip]
    # smallest fits first (the augmented ones beside the plain ones): a run cut short keeps every n it reached
    grid.sort(key=lambda g: (g[1], g[0], g[2]))
    settings, before = [], {}
    if args.append and (out / f"{STEM}{args.tag}.json").is_file():
        before = json.loads((out / f"{STEM}{args.tag}.json").read_text())
        settings = before["settings"]
        have = {(st["augment"], st["n"], st["copies"]) for st in settings}
        grid = [g for g in grid if g not in have]
        print(f"appending to {len(settings)} settings measured before: {len(grid)} to run", flush=True)
    acc = before.get("accuracy")  # an appending sitting keeps the earlier comparison unless it measures one
    for i, (augment, n, S) in enumerate(grid):
        X, y = build_data(n, args.image, device)
        batch = fit_batch(n)
        fns = contenders(augment, S, batch, args.num_data)
        repeats = args.repeats if n <= 32 else args.repeats_large
        t0 = time.perf_counter()
        res = time_setting(fns, model, X, y, repeats, args.warmup if i == 0 else 0, device)
        setting = {"augment": augment, "n": n, "copies": S, "batch": batch, "repeats": repeats, "results": res}
        setting["breakdown"] = {k: breakdown(res, k) for k in res if k.startswith("marglik-")}
        setting["ratios"] = ratios(setting)
        settings.append(setting)
        settings.sort(key=lambda st: (st["n"], st["augment"], st["copies"]))
        print(f"[{time.perf_counter() - t0:6.0f} s] aug={augment} n={n} S={S}: "
              + ", ".join(f"{k} {v['median_s']:.2f}" for k, v in res.items()), flush=True)
        print("    " + ", ".join(f"{k} {v:.2f}" for k, v in setting["ratios"].items()), flush=True)
        _write(out, args, _meta(args, device, name, n_params, load_before, before), settings,
               accuracy=acc)  # what finished, so far
    if not args.no_accuracy:
        n = min(args.sizes)
        X, y = build_data(n, args.image, device)
        print(f"accuracy: float32 vs float64 at n = {n} ...", flush=True)
        acc = {"n": n, "rows": accuracy(model, X, y, fit_batch(n), args.num_data)}
    return _write(out, args, _meta(args, device, name, n_params, load_before, before), settings, final=True,
                  accuracy=acc)


def _meta(args, device, name: str, n_params: int, load_before: float, before: Optional[dict] = None) -> dict:
    """The run's setting; an appending sitting keeps the earlier sittings' note (``--note``)."""
    kept = {k: v for k, v in (before or {}).get("meta", {}).items() if k == "note"}
    return {**kept,
        "model": f"{name} (norm='none', zero-initialised layers given a small random init), {n_params} parameters",
        "images": f"3x{args.image}x{args.image}, random; {args.num_data} examples represented",
        "device": str(device) if device.type != "cpu" else f"cpu ({platform.processor() or platform.machine()})",
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": args.threads, "torch": torch.__version__, "quick": args.quick, "warmup": args.warmup,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "rows_max_fraction": __import__("marglik").curvature.row_factor.ROWS_MAX_FRACTION,
        "command": "python scripts/bench_marglik_step.py" + (f" --device {device.type} --tag {args.tag}"
                                                            if device.type != "cpu" else ""),
    }


def _write(out: Path, args, meta: dict, settings: list, final: bool = False, accuracy: Optional[dict] = None) -> dict:
    payload = {"meta": meta, "settings": settings, "accuracy": accuracy}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{STEM}{args.tag}.json").write_text(json.dumps(payload, indent=2))
    md = render(payload)
    (out / f"{STEM}{args.tag}.md").write_text(md)
    if final:
        print(md)
    return payload


def missing_settings(settings: list) -> list:
    """Labels of the default grid's settings (n in {32, 128, 1000}, S in {1, 2, 8}) absent from ``settings``
    (computed from the settings, so a file measured in several sittings states what it lacks)."""
    have = {(s["augment"], s["n"], s["copies"]) for s in settings}
    grid = [(False, n, 1) for n in GRID_SIZES] + [(True, n, S) for n in GRID_SIZES for S in GRID_COPIES]
    return [_label({"augment": a, "n": n, "copies": S}) for a, n, S in grid if (a, n, S) not in have]


def _label(s: dict) -> str:
    return f"n = {s['n']}" + (f", S = {s['copies']}" if s["augment"] else "")


def render(payload: dict) -> str:
    meta, settings = payload["meta"], payload["settings"]
    noaug = [s for s in settings if not s["augment"]]
    aug = [s for s in settings if s["augment"]]
    lines = [
        "# One marginal-likelihood step on WRN-16-4: marglik vs laplace-torch + curvlinops",
        "",
        f"- model: {meta['model']}; images {meta['images']}; device {meta['device']}"
        + (f" ({meta['gpu']})" if meta.get("gpu") else "") + f"; torch {meta['torch']}, {meta['threads']} thread(s)",
        "- step: `KronLaplace.fit` (type-2) on n images in batches, log marginal likelihood at a layerwise "
        "prior, gradient w.r.t. the log prior precisions; with augmentation the n images are augmented into S "
        "copies first (six affine generators), the fit is differentiable and the gradient also goes to eta",
        "- `marglik-*`: rank-bounded factors (factors from at most "
        f"{meta['rows_max_fraction']} of their dimension in rows decomposed through the rows); `-dense`: every "
        "factor dense (the peers' path); `laplace-torch-*`: `KronLaplace` + `CurvlinopsGGN`; `floor`: forward + "
        "K = C - 1 backward passes to the layer outputs a type-2 fit cannot avoid (plus, with augmentation, "
        "their graphs and the gradient through them to eta), no factors",
        "- contenders timed round-robin in one process; medians of the repeats (3 for n <= 32, else 1); "
        "1-minute load average before / after: " + " / ".join(f"{v:.1f}" for v in meta["load_average_1min"]),
        "",
    ]
    if noaug:
        lines += ["## Without augmentation", "", "| n (batches) | marglik reduce | reduce dense | marglik expand | "
                  "expand dense | laplace-torch reduce | laplace-torch expand | floor | reduce / peer | expand / peer | "
                  "reduce / expand | reduce / floor |", "|---|" + "---:|" * 11]
        for s in noaug:
            m = {k: v["median_s"] for k, v in s["results"].items()}
            r = s["ratios"]
            lines.append(
                f"| {s['n']} ({s['n'] // s['batch']} x {s['batch']}) | {m['marglik-reduce']:.2f} | "
                f"{m['marglik-reduce-dense']:.2f} | {m['marglik-expand']:.2f} | {m['marglik-expand-dense']:.2f} | "
                f"{m['laplace-torch-reduce']:.2f} | {m['laplace-torch-expand']:.2f} | {m['floor']:.2f} | "
                f"**{r['reduce/laplace-torch reduce']:.2f}** | {r['expand/laplace-torch expand']:.2f} | "
                f"**{r['reduce/expand']:.2f}** | **{r['marglik-reduce/floor']:.2f}** |")
        lines += ["", "Seconds per step (medians); ratios of medians in the same process."]
    if aug:
        lines += ["", "## With learned augmentation", "",
                  "| n, S | reduce-reduce | reduce-reduce dense | expand-reduce | expand-expand | floor | "
                  "reduce-reduce / expand-reduce | reduce-reduce / expand-expand | reduce-reduce / floor | "
                  "expand-reduce / floor |", "|---|" + "---:|" * 9]
        for s in aug:
            m = {k: v["median_s"] for k, v in s["results"].items()}
            r = s["ratios"]
            lines.append(
                f"| {s['n']}, {s['copies']} | {m['marglik-reduce-reduce']:.2f} | {m['marglik-reduce-reduce-dense']:.2f} | "
                f"{m['marglik-expand-reduce']:.2f} | {m['marglik-expand-expand']:.2f} | {m['floor']:.2f} | "
                f"**{r['reduce-reduce/expand-reduce']:.2f}** | {r['reduce-reduce/expand-expand']:.2f} | "
                f"**{r['marglik-reduce-reduce/floor']:.2f}** | {r['marglik-expand-reduce/floor']:.2f} |")
    lines += ["", "## Where a step's time goes", "",
              "Seconds of the forward and backward passes (the floor's), the factor products and bookkeeping (the "
              "rest of the fit), the decomposition of the factors and the log determinant with its gradient (with "
              "augmentation: including the backward through the fit to eta); rows: factors kept as rows / all "
              "factors. Each part is a median of its own and the factor products are the remainder, so under machine "
              "load a small remainder can come out negative.", "",
              "| setting | contender | forward | backward passes | factor products | decomposition | "
              "log det + gradient | rows |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in settings:
        for name, b in s["breakdown"].items():
            if b is None:
                continue
            lines.append(f"| {_label(s)} | {name} | {b['forward']:.2f} | {b['backward_passes']:.2f} | "
                         f"{b['factor_products']:.2f} | {b['decomposition']:.2f} | {b['logdet_and_gradient']:.2f} | "
                         f"{b['row_factors']}/{b['factors']} |")
    acc = payload.get("accuracy")
    if acc:
        lines += ["", "## Accuracy in float32", "",
                  f"K-FAC-reduce on n = {acc['n']} images, log marglik and its gradient w.r.t. the layerwise log prior "
                  "precisions, float32 relative to float64 (dense factors; the float64 rows path agrees with it to the "
                  "last column). A dense float32 eigendecomposition of a factor of rank m < d puts round-off eigenvalues "
                  "(~1e-7 of the largest) on its null space instead of 0; against a weak prior they add spurious log "
                  "det terms. The rows path has no null space to get wrong.", "",
                  "| prior precision | rows: log marglik | rows: gradient | dense: log marglik | dense: gradient | "
                  "float64 rows vs dense |", "|---:|---:|---:|---:|---:|---:|"]
        for r in acc["rows"]:
            lines.append(f"| {r['prior_precision']:g} | {r['auto_lml_rel_err']:.1e} | {r['auto_grad_rel_err']:.1e} | "
                         f"{r['dense_lml_rel_err']:.1e} | {r['dense_grad_rel_err']:.1e} | "
                         f"{r['float64_rows_vs_dense_lml_rel']:.1e} |")
    missing = [] if meta.get("quick") else missing_settings(settings)
    if missing:
        lines += ["", "Not measured here: " + "; ".join(missing) + ". On a CPU the differentiable fits of 128 x 8 "
                  "and 1000 x S augmented images take hours per setting; `scripts/device_check.sh` runs the whole "
                  "grid on a GPU."]
    if meta.get("note"):
        lines += ["", "**Note.** " + meta["note"]]
    lines += ["", f"Reproduce: `{meta['command']}` (re-render: `--from-json`)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
