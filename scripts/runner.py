"""The one runner of the result generators in ``scripts/``: tuning runs in a process pool, one record
per run with its histories, result JSON with repository-relative paths, and markdown and figures
rendered from that JSON alone (a library module: no entry point).

A generator (``run_wrn_marglik.py``, ``run_invariance.py``, ...) builds its job list, calls
:func:`run_pool` with :func:`tune_job` (or its own job function), and passes its ``render``
(JSON -> markdown) and ``plot`` (JSON -> figure) to :func:`write_outputs`, which it calls again for
``--from-json``. Nothing a renderer needs lives outside the JSON.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from benchlib import ROOT

#: per-epoch columns of ``history.csv`` a run record keeps (all the figures and tables need)
HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "test_acc", "test_nll", "log_marglik", "log_marglik_per_example",
                "hyperstep_log_marglik", "prior_prec_mean", "prior_prec_min", "prior_prec_max", "log_prior_change_max",
                "epoch_seconds",
                "hyper_seconds", "log_prior_change_argmax")


def repo_path(path: Any) -> str:
    """``path`` relative to the repository (``os.path.relpath`` when it lies outside), POSIX style."""
    p = Path(path).resolve()
    try:
        return p.relative_to(ROOT).as_posix()
    except ValueError:
        return Path(os.path.relpath(p, ROOT)).as_posix()


def portable_argv(argv: Sequence[str], drop: Sequence[str] = ("--raw",),
                  paths: Sequence[str] = ("--out", "--run-root", "--run-dir", "--from-json")) -> List[str]:
    """A recorded command line without the options in ``drop`` (with their values: scratch files of
    the machine that ran it) and with the values of the options in ``paths`` repository-relative
    (:func:`repo_path`); ``--opt value`` and ``--opt=value`` alike."""
    out: List[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        name, eq, value = a.partition("=")
        if name in drop:
            i += 1 if eq else 2
            continue
        if name in paths and eq:
            out.append(f"{name}={repo_path(value)}")
        elif name in paths and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out += [a, repo_path(args[i + 1])]
            i += 1
        else:
            out.append(a)
        i += 1
    return out


def history_record(history: List[Dict[str, Any]]) -> Dict[str, List[Any]]:
    """A run's ``history.csv`` rows as columns (:data:`HISTORY_KEYS` and every ``aug_*`` range)."""
    keys = list(HISTORY_KEYS) + sorted({k for row in history for k in row if k.startswith("aug_")})
    return {k: [row.get(k) for row in history] for k in keys if any(k in row for row in history)}


def tune_job(job: Dict[str, Any]) -> Dict[str, Any]:
    """Run one tuning job in this (worker) process with one torch thread.

    Args:
        job: ``name``, ``cfg`` (a nested config dict), ``run_root``, optionally ``post``: a
            module-level function ``post(job, tuner, summary) -> dict`` run on the finished tuner (whose
            model and hyperparameters are the reported ones) whose keys join the record; any other
            keys are copied into the record.

    Returns:
        The record: the job's own keys (without ``cfg``), the run's ``summary`` (``summary.json``),
        its ``history`` (:func:`history_record`), ``run_dir`` (repository-relative) and
        ``wall_seconds``; or ``error`` when the run failed (one failed run must not lose the others).
    """
    import torch

    torch.set_num_threads(1)
    from marglik.tuning import Config, MarglikTuner
    from marglik.tuning.reporting import read_history

    run_dir = Path(job["run_root"]) / job["name"]
    rec = {k: v for k, v in job.items() if k not in ("cfg", "run_root", "post")}
    rec["run_dir"] = repo_path(run_dir)
    t0 = time.time()
    try:
        tuner = MarglikTuner(Config.from_dict(job["cfg"]), run_dir)
        summary = tuner.fit()
        if job.get("post") is not None:  # a follow-up on the finished run (e.g. a common yardstick)
            rec.update(job["post"](job, tuner, summary))
    except Exception as e:  # reported in the results, not hidden
        rec.update({"error": f"{type(e).__name__}: {e}", "wall_seconds": time.time() - t0})
        return rec
    rec.update({"summary": summary, "history": history_record(read_history(run_dir / "history.csv")),
                "wall_seconds": time.time() - t0})
    return rec


def run_pool(jobs: Sequence[Dict[str, Any]], workers: int, on_result: Callable[[List[Dict[str, Any]]], None],
             fn: Callable[[Dict[str, Any]], Dict[str, Any]] = tune_job,
             describe: Optional[Callable[[Dict[str, Any]], str]] = None) -> List[Dict[str, Any]]:
    """Run ``fn(job)`` for every job in ``workers`` spawned processes.

    Args:
        jobs: the jobs (picklable dicts).
        workers: processes at a time.
        on_result: called with all records so far after every finished job (write the outputs then:
            an interrupted sweep keeps what finished).
        fn: the job function (default :func:`tune_job`).
        describe: one line about a finished record for the progress log (default: its name).

    Returns:
        The records in the order the jobs finished.
    """
    t0 = time.time()
    done: List[Dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
        futures = [ex.submit(fn, job) for job in jobs]
        for f in as_completed(futures):
            rec = f.result()
            done.append(rec)
            what = f"FAILED: {rec['error']}" if "error" in rec else (describe(rec) if describe else "")
            print(f"[{time.time() - t0:6.0f} s] {rec.get('name', '?'):<28} {what}", flush=True)
            on_result(done)
    return done


def write_outputs(out: Path, stem: str, data: Dict[str, Any], render: Callable[[Dict[str, Any]], str],
                  plot: Optional[Callable[[Dict[str, Any], Path], None]] = None, keep: Sequence[str] = (),
                  indent: int = 1, end: str = "\n") -> None:
    """Write ``<stem>.json`` (``data``, ``json.dumps(data, indent=indent) + end``), ``<stem>.md``
    (``render(data)``) and ``<stem>.png`` (``plot(data, path)``) under ``out``; keys in ``keep`` of an
    existing JSON that ``data`` lacks (sections another script writes) are carried over."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / f"{stem}.json"
    if keep and jpath.exists():
        old = json.loads(jpath.read_text())
        for key in keep:
            if key in old and key not in data:
                data[key] = old[key]
    jpath.write_text(json.dumps(data, indent=indent) + end)
    render_outputs(out, stem, data, render, plot)


def render_outputs(out: Path, stem: str, data: Dict[str, Any], render: Callable[[Dict[str, Any]], str],
                   plot: Optional[Callable[[Dict[str, Any], Path], None]] = None) -> str:
    """Write ``<stem>.md`` (``render(data)``) and ``<stem>.png`` (``plot(data, path)``) under ``out``
    from ``data`` alone, leaving ``<stem>.json`` as it is (``--from-json``). Returns the markdown."""
    out = Path(out)
    md = render(data)
    (out / f"{stem}.md").write_text(md)
    if plot is not None:
        plot(data, out / f"{stem}.png")
    return md


def read_json(out: Path, stem: str) -> Dict[str, Any]:
    """``<out>/<stem>.json``."""
    return json.loads((Path(out) / f"{stem}.json").read_text())


def rerender(out: Path, stem: str, render: Callable[[Dict[str, Any]], str],
             plot: Optional[Callable[[Dict[str, Any], Path], None]] = None) -> Dict[str, Any]:
    """``--from-json``: read ``<out>/<stem>.json`` and rewrite its markdown (and figure) from it alone."""
    data = read_json(out, stem)
    render_outputs(out, stem, data, render, plot)
    return data
