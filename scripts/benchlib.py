"""Helpers shared by the benchmark scripts in ``scripts/``: the benchmark model and data, device
choice, synchronised timing and peak-memory measurement.

The scripts import it as a sibling module (``python scripts/<name>.py`` puts ``scripts/`` first on
``sys.path``); ``marglik`` itself comes from the installed package (``pip install -e .``).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
CPU = torch.device("cpu")

#: the default job's run protocol before issue #28 (``v0`` in ``results/marglik_vs_grid.md``), as config
#: overrides: MAP steps on all S = 8 copies, two type-2 hypersteps on 4 x 128 examples per epoch, constant hyper
#: lrs (aug_lr 0.1, the default then), the whole-set selection value after every update. The studies made under
#: it (selection_digits, the digits-CNN parts of reduce_invariance, marglik_vs_grid's v0 rows) pin it, so that
#: they reproduce under today's defaults.
V0_PROTOCOL: Dict[str, Dict[str, Any]] = {
    "hyper": {"n_samples": 8, "train_samples": None, "steps": 2, "frequency": 1, "marglik_batches": 4,
              "schedule": "constant", "aug_lr": 0.1, "selection": "full", "selection_every": 1},
    "curvature": {"fisher_type": "type-2"},
}


def pick_device(name: str) -> torch.device:
    """``"auto"``: cuda when available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for queued kernels (CUDA), so that wall-clock times measure the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_runs(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> List[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    return statistics.median(timed_runs(fn, repeats, device))


def wide_resnet(depth: int = 16, width: int = 4, device: torch.device = CPU, seed: int = 0,
                reinit_zero: bool = False) -> nn.Module:
    """``WRN-depth-width`` with ``norm="none"`` (only Conv2d and Linear, so every peer covers every
    layer). ``reinit_zero``: replace the Fixup-style zero initialisation by a small random one, so
    that no factor below the head is trivially zero."""
    from marglik.models import WideResNet

    torch.manual_seed(seed)
    model = WideResNet(depth=depth, widen_factor=width, num_classes=10, in_channels=3, norm="none").to(device)
    if reinit_zero:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.abs().max() == 0:
                    nn.init.kaiming_normal_(m.weight)
                    m.weight.mul_(0.1)
    return model


def random_batch(n: int, image: int = 32, device: torch.device = CPU,
                 generator: torch.Generator = None) -> Tuple[Tensor, Tensor]:
    """``n`` random CIFAR-shaped images ``(n, 3, image, image)`` and labels in ``[0, 10)``."""
    X = torch.randn(n, 3, image, image, generator=generator).to(device)
    y = torch.randint(0, 10, (n,), generator=generator).to(device)
    return X, y


class RSSPeak:
    """Peak of the *current* resident set size, sampled every 2 ms from ``/proc/self/statm``
    (``ru_maxrss`` is useless here: importing a CUDA build of torch sets a high-water mark above
    everything a benchmark allocates afterwards). Use as a context manager; ``peak - base`` is the
    extra memory of what ran inside."""

    def __init__(self) -> None:
        import os
        import threading

        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.base = self.peak = self.current()

    def current(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(0.002)

    def __enter__(self) -> "RSSPeak":
        self.base = self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def in_fresh_process(target: Callable[[Any, Any], None], payload: Any) -> Any:
    """Run ``target(payload, queue)`` in a spawned process and return what it put on the queue: a
    measurement (peak memory) that must start from a clean process."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(payload, q))
    p.start()
    val = q.get()
    p.join()
    return val


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes of extra memory ``fn()`` needs at its peak: CUDA ``max_memory_allocated`` over the
    current allocation, CPU the resident-set-size peak over the process before the call (run it in
    a fresh process for a clean number)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return max(torch.cuda.max_memory_allocated(device) - base, 0)
    with RSSPeak() as rss:
        fn()
    return max(rss.peak - rss.base, 0)


def time_hypersteps(tuners: dict, repeats: int, rotation_deg: float) -> dict:
    """Seconds of the marglik hypersteps of one update of the tuning loop
    (:meth:`MarglikTuner._hyper_update`, as the loop itself times them: not the selection value) per
    tuner, tuners interleaved, ``repeats`` rounds; the learned rotation range is reset to
    ``rotation_deg`` before each step (distinct copies). Returns the raw times, medians, minima and
    both as ratios to the ``"reduce-reduce"`` tuner (``None`` without one)."""
    times = {name: [] for name in tuners}
    for _ in range(repeats):
        for name, t in tuners.items():
            with torch.no_grad():
                t.aug.eta.fill_(math.radians(rotation_deg))
            done = len(t.timing["marglik_step_seconds"])
            t._hyper_update()  # its hypersteps, then the selection value (not timed here)
            times[name].append(sum(t.timing["marglik_step_seconds"][done:]))
    med = {name: statistics.median(v) for name, v in times.items()}
    low = {name: min(v) for name, v in times.items()}
    base, base_low = med.get("reduce-reduce"), low.get("reduce-reduce")
    return {"seconds": times, "median_seconds": med, "min_seconds": low,
            "ratio_to_reduce_reduce": {k: v / base for k, v in med.items()} if base else None,
            "min_ratio_to_reduce_reduce": {k: v / base_low for k, v in low.items()} if base_low else None,
            "repeats": repeats, "rotation_deg": rotation_deg}


def write_result(out: Path, stem: str, result: Dict[str, Any], render: Callable[[Dict[str, Any]], str],
                 indent: int = 2) -> str:
    """Write ``<out>/<stem>.json`` (``result``) and ``<out>/<stem>.md`` (``render(result)``, rendered
    once), creating ``out``, and print the markdown. Returns the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=indent))
    md = render(result)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return md


# ------------------------------------------------------------------ tuning-run reports
def flavour_label(run: Dict[str, Any]) -> str:
    """``<approx>-<copies_approx>`` of a tuning run; a run without augmentation has no copies:
    ``expand (no copies)``."""
    if run.get("copies_approx") is None:
        return f"{run['approx']} (no copies)"
    return f"{run['approx']}-{run['copies_approx']}"


def rollback_count(value: Any) -> int:
    """Rollbacks as a number: summaries hold a list of events or (newer schema) their count."""
    return value if isinstance(value, int) else len(value or [])


def hyperstep_timing_rows(timing: Dict[str, Any], order: Mapping[str, int], digits: int) -> List[str]:
    """The markdown table of :func:`time_hypersteps`' result: per flavour (sorted by ``order``) the
    median and minimum seconds with ``digits`` decimals and both as ratios to reduce-reduce."""
    lines = ["| K-FAC (pixels-copies) | median s / step | ratio to reduce-reduce | min s / step | ratio of minima |",
             "|---|---:|---:|---:|---:|"]
    ratios = timing.get("ratio_to_reduce_reduce") or {}
    low, low_ratios = timing.get("min_seconds") or {}, timing.get("min_ratio_to_reduce_reduce") or {}
    nan = float("nan")
    for fl, v in sorted(timing["median_seconds"].items(), key=lambda kv: order.get(kv[0], 9)):
        lines.append(f"| {fl} | {v:.{digits}f} | {ratios.get(fl, nan):.2f} | "
                     f"{low.get(fl, nan):.{digits}f} | {low_ratios.get(fl, nan):.2f} |")
    return lines


def fitted_at(tuner: Any, rotation_deg: float) -> Tuple[Any, float, float]:
    """The selection value's own fit (:meth:`marglik.tuning.parts.selection.Selection.fit`: same seeded
    noise) at the rotation range ``rotation_deg``, without gradient: ``(la, log marglik, seconds)``; the
    log marglik sets ``la``'s prior precision to the run's. Used by ``wrn_rotation_terms.py`` and ``reduce_invariance.py``."""
    sel = tuner.parts.selection
    with torch.no_grad():
        sel.augmenter.eta.fill_(math.radians(rotation_deg))
    tuner.model.eval()
    t0 = time.perf_counter()
    la = sel.fit()
    with torch.no_grad():
        lml = float(sel.laplace.log_marglik(la))
    return la, lml, time.perf_counter() - t0
