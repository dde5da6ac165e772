"""marglik's laplace-torch backends on ``subset_of_weights="last_layer"`` / ``"subnetwork"``, against
laplace-torch's own backends and the exact GGN / EF (float64, small models).

For each case: the largest absolute and relative differences (``max|a - b| / max|b|``) of the
curvature laplace-torch accumulates (``H``), the log marginal likelihood and its gradient in a
scalar prior precision. Then the fit time of a full-structure subnetwork Laplace (subnetwork =
the head of a small CNN) with marglik's backend (Jacobians over the touched tensors) and with
laplace-torch's Curvlinops backend (``torch.func`` Jacobians over all parameters, then indexed).

Usage::

    python scripts/check_laplace_torch_subsets.py              # seconds on a CPU
    python scripts/check_laplace_torch_subsets.py --from-json  # re-render the markdown from the JSON alone
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchlib import ROOT
from runner import rerender, write_outputs

sys.path.insert(0, str(ROOT / "tests"))  # the tests' models and references
from laplace.curvature import AsdlEF, AsdlGGN, CurvlinopsEF, CurvlinopsGGN  # noqa: E402
from laplace.utils import ModuleNameSubnetMask  # noqa: E402
from test_laplace_torch_subsets import (  # noqa: E402
    DT,
    H_of,
    TokenNet,
    data,
    drop_weight_bias_coupling,
    exact_curvature,
    fit,
    lml_and_grad,
    mlp,
)

from marglik import MarglikEF, MarglikEFReduce, MarglikGGN, MarglikGGNReduce  # noqa: E402

STEM = "laplace_torch_subsets"
PRIOR = torch.tensor([1.6], dtype=DT)


def diff(a: torch.Tensor, b: torch.Tensor) -> Dict[str, float]:
    a, b = torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT)
    d = (a - b).abs().max().item()
    return {"abs": d, "rel": d / max(b.abs().max().item(), 1e-300)}


def compare(name: str, ours, ref, ref_name: str, curv_scale: float = 1.0) -> Dict[str, Any]:
    row = {"case": name, "reference": ref_name, "H": diff(curv_scale * H_of(ours), H_of(ref))}
    if curv_scale == 1.0:
        (l1, g1), (l2, g2) = lml_and_grad(ours, PRIOR), lml_and_grad(ref, PRIOR)
        row["lml"], row["lml_grad"] = diff(l1, l2), diff(g1, g2)
    return row


def compare_matrix(name: str, H: torch.Tensor, ref: torch.Tensor, ref_name: str) -> Dict[str, Any]:
    return {"case": name, "reference": ref_name, "H": diff(H, ref)}


def last_layer_rows() -> List[Dict[str, Any]]:
    rows = []
    for lik in ("classification", "regression"):
        C = 3 if lik == "classification" else 2
        sig = 0.8 if lik == "regression" else 1.0
        model = mlp(C)
        dl = data(model, lik)
        for kind, Ours, refs in (("GGN", MarglikGGN, (CurvlinopsGGN, AsdlGGN)), ("EF", MarglikEF, (CurvlinopsEF, AsdlEF))):
            scale = 2.0 if (kind == "EF" and lik == "regression") else 1.0
            for approx in ("expand", "reduce"):
                ours = fit(model, lik, Ours, dl, approx=approx, prior_precision=0.7, sigma_noise=sig)
                for Ref in refs:
                    rows.append(compare(f"MLP, last layer, kron, {kind} {approx}, {lik}", ours,
                                        fit(model, lik, Ref, dl, prior_precision=0.7, sigma_noise=sig), Ref.__name__,
                                        scale))
        model = TokenNet(C).to(DT)
        dl = data(model, lik, shape=(5, 3))
        kw = dict(prior_precision=0.7, last_layer_name="head", sigma_noise=sig)
        for kind, (E, R, Cv, As) in (("GGN", (MarglikGGN, MarglikGGNReduce, CurvlinopsGGN, AsdlGGN)),
                                     ("EF", (MarglikEF, MarglikEFReduce, CurvlinopsEF, AsdlEF))):
            scale = 2.0 if (kind == "EF" and lik == "regression") else 1.0
            expand, reduce = fit(model, lik, E, dl, **kw), fit(model, lik, R, dl, **kw)
            rows.append(compare(f"token head (T=5, logits averaged), {kind} expand, {lik}", expand,
                                fit(model, lik, Cv, dl, **kw), Cv.__name__, scale))
            rows.append(compare(f"token head (T=5, logits averaged), {kind} reduce, {lik}", reduce,
                                fit(model, lik, As, dl, feature_reduction="average", **kw),
                                As.__name__ + ' (feature_reduction="average")', scale))
            if kind == "GGN" and lik == "regression":
                X, y = dl.dataset.tensors
                exact = drop_weight_bias_coupling(exact_curvature(model, list(model.head.parameters()), X, y, lik,
                                                                  "ggn"), 4 * C)
                rows.append(compare_matrix(f"token head, GGN reduce, {lik}", H_of(reduce), exact,
                                           "exact GGN (theory: exact)"))
                rows.append(compare_matrix(f"token head, GGN expand, {lik} (negative control)", H_of(expand), exact,
                                           "exact GGN (theory: not exact)"))
        for kind, Ours, Peer in (("GGN", MarglikGGN, CurvlinopsGGN), ("EF", MarglikEF, CurvlinopsEF)):
            X, y = dl.dataset.tensors
            exact = exact_curvature(model, list(model.head.parameters()), X, y, lik, kind.lower())
            if kind == "EF" and lik == "regression":
                exact = 2 * exact
            ours = fit(model, lik, Ours, dl, structure="diag", feature_reduction="average", **kw)
            peer = fit(model, lik, Peer, dl, structure="diag", feature_reduction="average", **kw)
            rows.append(compare_matrix(f"token head, last layer, diag, {kind}, {lik}", ours.H, exact.diagonal(),
                                       f"exact {kind}"))
            rows.append(compare_matrix(f"token head, last layer, diag, {kind}, {lik}: laplace-torch {Peer.__name__}",
                                       peer.H, exact.diagonal(), f"exact {kind}"))
    return rows


def subnet_rows() -> List[Dict[str, Any]]:
    rows = []
    idx = torch.LongTensor([27, 4, 0, 31, 16, 21, 11])
    for lik in ("classification", "regression"):
        C = 3 if lik == "classification" else 2
        model = mlp(C)
        dl = data(model, lik)
        kw = dict(subnetwork_indices=idx, prior_precision=0.8, sigma_noise=0.7 if lik == "regression" else 1.0)
        for kind, Ours, refs in (("GGN", MarglikGGN, (CurvlinopsGGN, AsdlGGN)), ("EF", MarglikEF, (CurvlinopsEF, AsdlEF))):
            for structure in ("full", "diag"):
                ours = fit(model, lik, Ours, dl, subset="subnetwork", structure=structure, **kw)
                for Ref in refs:
                    rows.append(compare(f"MLP, subnetwork (7 entries), {structure}, {kind}, {lik}", ours,
                                        fit(model, lik, Ref, dl, subset="subnetwork", structure=structure, **kw),
                                        Ref.__name__))
    return rows


def subnet_timing(repeats: int = 3) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))
    X, y = torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,))
    dl = DataLoader(TensorDataset(X, y), batch_size=32)
    mask = ModuleNameSubnetMask(model, module_names=["7"])
    mask.select(dl)
    out: Dict[str, Any] = {"model": "CNN 3-32-64 conv, 4096-128-10 MLP, 8x8 inputs, float32",
                           "params": sum(p.numel() for p in model.parameters()), "subnet": int(mask.indices.numel()),
                           "batch": 32, "examples": 64, "threads": torch.get_num_threads()}
    for Backend in (MarglikGGN, CurvlinopsGGN):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            la = fit(model, "classification", Backend, dl, subset="subnetwork", structure="full",
                     subnetwork_indices=mask.indices)
            times.append(time.perf_counter() - t0)
        out[Backend.__name__] = {"fit_seconds_min": min(times), "H": la.H}
    d = diff(out["MarglikGGN"].pop("H"), out["CurvlinopsGGN"].pop("H"))
    out["H_diff"] = d
    return out


def fmt(d: Dict[str, float]) -> str:
    return f"{d['abs']:.1e} / {d['rel']:.1e}"


def render(result: Dict[str, Any]) -> str:
    lines = [
        "# laplace-torch's last-layer and subnetwork Laplace with marglik's backends",
        "",
        "Generated by `scripts/check_laplace_torch_subsets.py` (float64, small models; "
        f"torch {result['torch']}, laplace-torch {result['laplace_torch']}). Each cell: max abs / max rel "
        "difference (`max|a-b| / max|b|`) of marglik's backend against the reference, for the curvature "
        "laplace-torch accumulates (`H`), the log marginal likelihood and its gradient in the prior "
        "precision (`-`: not compared, e.g. the EF for regression, where marglik's EF is that of "
        "`0.5 ||y-f||^2` and laplace-torch's is twice it; `H` is compared after the factor 2).",
        "",
        "| case | reference | H | log marglik | d log marglik / d prior |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['reference']} | {fmt(r['H'])} | "
                     f"{fmt(r['lml']) if 'lml' in r else '-'} | {fmt(r['lml_grad']) if 'lml_grad' in r else '-'} |")
    t = result["timing"]
    lines += [
        "",
        f"Subnetwork fit time ({t['model']}, {t['params']} parameters, subnetwork = the head's {t['subnet']} "
        f"entries, `hessian_structure=\"full\"`, {t['examples']} examples in batches of {t['batch']}, "
        f"{t['threads']} CPU threads, best of 3): MarglikGGN {t['MarglikGGN']['fit_seconds_min']:.3f} s "
        f"(Jacobians over the touched tensors), laplace-torch CurvlinopsGGN "
        f"{t['CurvlinopsGGN']['fit_seconds_min']:.3f} s (Jacobians over all parameters, then indexed); "
        f"H differs by {fmt(t['H_diff'])}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--from-json", action="store_true")
    args = ap.parse_args(argv)
    if args.from_json:
        return rerender(Path(args.out), STEM, render)
    warnings.filterwarnings("ignore")  # laplace-torch's link_approx / deprecation notices
    import importlib.metadata as md

    result = {"torch": torch.__version__, "laplace_torch": md.version("laplace-torch"), "machine": platform.machine(),
              "rows": last_layer_rows() + subnet_rows(), "timing": subnet_timing()}
    write_outputs(Path(args.out), STEM, result, render)
    print(render(result), end="")
    return result


if __name__ == "__main__":
    main()
