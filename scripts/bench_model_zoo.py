"""torchvision's classification families as shipped: K-FAC coverage, fit cost, and the peers' outcome.

Per family (the full-size torchvision architecture, random init, 10 classes, float32 on CPU):

* the share of parameters in K-FAC (Kronecker) blocks, in per-channel or dense blocks (norms'
  affine parameters, ConvNeXt's layer scale, ViT's class token and positional embedding, Swin's and
  MaxViT's relative-position bias tables), and ignored (``ignore_modules``, only where a module has
  no rule);
* the time of ``marglik.KFAC(model).fit`` on one batch as a multiple of one forward + backward
  (parameter gradients of the summed cross-entropy) on the same batch, each the minimum of
  ``--repeats`` runs after a warm-up;
* laplace-torch's ``Laplace(model, "classification", subset_of_weights="all",
  hessian_structure="kron", backend=...)`` fitted on the same batch with its Curvlinops, ASDL and
  BackPACK GGN backends, each in a fresh process on a fresh copy of the network, capped at
  ``--peer-memory`` GiB and ``--peer-limit`` seconds: ``works`` or the first line of its error.

Writes ``results/model_zoo.{json,md}``; ``--from-json`` re-renders the markdown from the JSON alone.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from benchlib import RESULTS, write_result
from runner import rerender

STEM = "model_zoo"
#: family -> (torchvision name, image size, extra constructor kwargs)
FAMILIES: Dict[str, tuple] = {
    "resnet18": ("resnet18", 32, {}),
    "resnet50": ("resnet50", 32, {}),
    "wide_resnet50_2": ("wide_resnet50_2", 32, {}),
    "resnext50_32x4d": ("resnext50_32x4d", 32, {}),
    "mobilenet_v3_small": ("mobilenet_v3_small", 32, {}),
    "efficientnet_b0": ("efficientnet_b0", 32, {}),
    "convnext_tiny": ("convnext_tiny", 32, {}),
    "regnet_x_400mf": ("regnet_x_400mf", 32, {}),
    "regnet_y_400mf": ("regnet_y_400mf", 32, {}),
    "densenet121": ("densenet121", 32, {}),
    "shufflenet_v2_x0_5": ("shufflenet_v2_x0_5", 32, {}),
    "squeezenet1_0": ("squeezenet1_0", 32, {}),
    "vit_b_16": ("vit_b_16", 32, {"image_size": 32}),
    "swin_t": ("swin_t", 32, {}),
    "maxvit_t": ("maxvit_t", 224, {}),
}
PEERS = ("CurvlinopsGGN", "AsdlGGN", "BackPackGGN")


def ignores(name: str) -> List[type]:
    """The module types a family needs ignored (no K-FAC rule): none today (kept for new families)."""
    return []


def build(name: str, classes: int) -> nn.Module:
    import torchvision

    arch, _, kw = FAMILIES[name]
    torch.manual_seed(0)
    return torchvision.models.get_model(arch, weights=None, num_classes=classes, **kw).eval()


def coverage(kfac: Any, model: nn.Module) -> Dict[str, Any]:
    """Parameter counts (and shares) in K-FAC, per-channel / dense and no block."""
    from marglik.curvature.layers import ElementwiseRule
    from marglik.curvature.layers.leaf import LeafDenseRule

    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts = {"kfac": 0, "per_channel_or_dense": 0}
    for b in kfac.covered:
        n = sum(p.numel() for p in b.params)
        dense = isinstance(b.rule, (ElementwiseRule, LeafDenseRule))
        counts["per_channel_or_dense" if dense else "kfac"] += n
    counts["ignored"] = total - counts["kfac"] - counts["per_channel_or_dense"]
    return {"total": total, **counts, **{f"{k}_pct": 100.0 * v / total for k, v in counts.items()}}


def _min_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _peer_child(payload: tuple, queue: Any) -> None:
    """In a spawned process: cap its memory, fit the peer, put ``works`` or the error's first line.

    The cap is ``RLIMIT_DATA`` (private writable memory: tensors), not the address space, which
    torch's mapped libraries alone fill by several GiB."""
    import resource

    name, classes, batch, backend, mem_gb = payload
    resource.setrlimit(resource.RLIMIT_DATA, (mem_gb << 30, mem_gb << 30))
    torch.set_num_threads(1)
    try:
        import laplace
        from laplace import curvature as lc
        from torch.utils.data import DataLoader, TensorDataset

        model = build(name, classes)
        X, y = batch_of(name, batch, classes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
                                 backend=getattr(lc, backend))
            la.fit(DataLoader(TensorDataset(X, y), batch_size=len(X)))
        queue.put("works")
    except MemoryError:
        queue.put(f"out of memory (> {mem_gb} GiB)")
    except Exception as err:  # the peer's own error, reported as it says it
        line = (str(err).strip().splitlines() or [""])[0]
        queue.put(f"{type(err).__name__}: {line}"[:160])


def peer_outcome(name: str, classes: int, batch: int, backend: str, limit: int, mem_gb: int) -> str:
    """``works`` or the first line of laplace-torch's error, from a fresh process capped at ``mem_gb``
    GiB and ``limit`` seconds (a fresh copy of the network each time: a failed peer may leave hooks)."""
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peer_child, args=((name, classes, batch, backend, mem_gb), q))
    p.start()
    try:
        return q.get(timeout=limit)
    except queue_mod.Empty:
        return f"timeout (> {limit} s)" if p.is_alive() else f"crashed (exit code {p.exitcode}; memory cap {mem_gb} GiB)"
    finally:
        if p.is_alive():
            p.kill()
        p.join()


def batch_of(name: str, batch: int, classes: int):
    """The family's fixed random batch ``(X, y)``."""
    size = FAMILIES[name][1]
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g)


def one_family(name: str, batch: int, classes: int, repeats: int, peer_limit: int, peers: bool,
               mem_gb: int) -> Dict[str, Any]:
    import marglik

    model = build(name, classes)
    size = FAMILIES[name][1]
    X, y = batch_of(name, batch, classes)
    row: Dict[str, Any] = {"family": name, "image_size": size, "ignore_modules": [t.__name__ for t in ignores(name)]}
    try:
        kfac = marglik.KFAC(model, ignore_modules=ignores(name))
        row["coverage"] = coverage(kfac, model)

        def fwd_bwd():
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(X), y, reduction="sum").backward()

        row["fwd_bwd_s"] = _min_time(fwd_bwd, repeats)
        model.zero_grad(set_to_none=True)
        row["fit_s"] = _min_time(lambda: kfac.fit((X, y)), repeats)
        row["fit_over_fwd_bwd"] = row["fit_s"] / row["fwd_bwd_s"]
        row["marglik"] = "works"
    except Exception as err:  # reported, not hidden
        row["marglik"] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"[:200]
    if peers:
        row["peers"] = {b: peer_outcome(name, classes, batch, b, peer_limit, mem_gb) for b in PEERS}
    print(row, flush=True)
    return row


def render(result: Dict[str, Any]) -> str:
    """The markdown report, from the JSON alone."""
    s = result["settings"]
    lines = [
        "# torchvision classifiers as shipped: K-FAC coverage, fit cost, peers",
        "",
        f"Full-size torchvision architectures, random init, {s['classes']} classes, batch {s['batch']}, float32 on "
        f"{s['device']} ({s['threads']} thread(s), {s['machine']}); torch {s['torch']}, torchvision {s['torchvision']}, "
        f"laplace-torch {s['laplace']}. Generated by `scripts/bench_model_zoo.py`.",
        "",
        "Coverage: share of the parameters in K-FAC (Kronecker) blocks, in per-channel or dense exact blocks "
        "(norms, layer scales, class tokens, positional embeddings), and ignored (`ignore_modules`, only for "
        "modules without a rule). Fit: `marglik.KFAC(model).fit` on the batch (expand, type-2, "
        f"{s['classes'] - 1} curvature columns) over one forward + backward on the same batch, min of "
        f"{s['repeats']} after a warm-up. Peers: laplace-torch `Laplace(model, \"classification\", "
        "subset_of_weights=\"all\", hessian_structure=\"kron\", backend=...)` fitted on the same batch, each in "
        f"a fresh process capped at {s['peer_memory_gib']} GiB of data memory and {s['peer_limit_s']} s.",
        "",
        *([f"Note: {s['note']}.", ""] if s.get("note") else []),
        "| family | input | params (M) | K-FAC % | per-channel/dense % | ignored % | fit / fwd+bwd | marglik "
        "| Curvlinops | ASDL | BackPACK |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        c = r.get("coverage")
        cov = (f"{c['total'] / 1e6:.2f} | {c['kfac_pct']:.2f} | {c['per_channel_or_dense_pct']:.2f} | "
               f"{c['ignored_pct']:.2f}") if c else "- | - | - | -"
        ratio = f"{r['fit_over_fwd_bwd']:.1f}x" if "fit_over_fwd_bwd" in r else "-"
        ml = r["marglik"] + (f" (ignoring {', '.join(r['ignore_modules'])})" if r["ignore_modules"] else "")
        peers = r.get("peers", {})
        cells = [peers.get(b, "not run").replace("|", "/") for b in PEERS]
        lines.append(f"| {r['family']} | {r['image_size']}x{r['image_size']} | {cov} | {ratio} | {ml} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Swin's `ShiftedWindowAttention` passes `qkv.weight` / `proj.weight` to a function: while "
              "recording, marglik turns those calls into calls of the `Linear` modules (same values); its and "
              "MaxViT's relative-position bias tables get exact dense blocks (`marglik/curvature/layers/relpos.py`).",
              ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peer-limit", type=int, default=120, help="seconds before a peer's fit counts as a timeout")
    ap.add_argument("--peer-memory", type=int, default=6, help="GiB a peer's process may allocate")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--peers-only", metavar="JSON", help="keep the marglik columns of this result JSON and rerun "
                    "only the peers (same settings)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--from-json", action="store_true", help="only re-render <out>/model_zoo.md from its JSON")
    args = ap.parse_args(argv)
    if args.from_json:
        return rerender(Path(args.out), STEM, render)
    import torchvision

    torch.set_num_threads(args.threads)
    settings = {"batch": args.batch, "classes": args.classes, "repeats": args.repeats, "threads": args.threads,
                "peer_memory_gib": args.peer_memory, "peer_limit_s": args.peer_limit,
                "device": "cpu", "machine": platform.machine(), "torch": torch.__version__,
                "torchvision": torchvision.__version__, "laplace": importlib.metadata.version("laplace-torch")}
    result: Dict[str, Any] = {"settings": settings, "rows": []}
    previous = {r["family"]: r for r in json.loads(Path(args.peers_only).read_text())["rows"]} if args.peers_only else {}
    for f in args.families:  # written after every family: a long run keeps what it measured
        if f in previous:
            row = {k: v for k, v in previous[f].items() if k != "peers"}
            row["peers"] = {b: peer_outcome(f, args.classes, args.batch, b, args.peer_limit, args.peer_memory)
                            for b in PEERS}
        else:
            row = one_family(f, args.batch, args.classes, args.repeats, args.peer_limit, not args.no_peers,
                             args.peer_memory)
        result["rows"].append(row)
        write_result(Path(args.out), STEM, result, render)
    return result


if __name__ == "__main__":
    main()
