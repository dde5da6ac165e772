"""``marglik-report DIR`` (also ``python -m marglik.report DIR``): select among finished runs by
their log marginal likelihood.

The marginal likelihood ranks discrete choices -- architectures, augmentation families, priors --
as well as it tunes continuous hyperparameters: run one job per choice (a Hydra sweep,
``marglik -m model=mlp,cnn ...``, or separate runs under one folder), then::

    marglik-report multirun/2025-01-01/12-00-00

reads every ``summary.json`` under ``DIR``, ranks the runs by their reported (selection) log
marginal likelihood, shows the test metrics beside it (for reading, not for selecting), names the
best configuration (its Hydra overrides from ``.hydra/overrides.yaml`` and the settings that vary
between the runs, from ``config.json``) and writes ``report.json`` (the data, relative paths),
``report.md`` and ``report.png`` (both rendered from that JSON alone) into ``DIR``.

Only values of the same quantity are ranked together: runs are grouped by their data (name,
training-set size, rotation, translation), their estimators (``selection_estimator``,
``marglik_estimator``) and their curvature approximation (backend, structure, K-FAC flavours,
Fisher type, bias blocks -- each is a different estimate of the evidence). Several groups are
each ranked on their own and flagged, naming what differs. Runs with warnings (rollbacks, chance
accuracy, an absurd value: ``summary.json['warnings']``) are ranked but marked.

Bad input -- no such folder, no ``summary.json`` under it, one that is not valid JSON or not a
marglik summary -- is one line ``marglik-report: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .errors import UserError, one_line
from .tuning.config import flatten

__all__ = ["ReportError", "build_report", "render_markdown", "plot_report", "rerun_overrides", "write_report", "main"]

#: the summary fields that define which runs are ranked together (data, estimators, curvature)
COMPARABLE = ("data", "train_size", "rotation", "translation", "selection_estimator", "marglik_estimator",
              "backend", "structure", "approx", "copies_approx", "fisher_type", "separate_bias")
#: summary fields a report needs
REQUIRED = ("log_marglik", "log_marglik_per_example", "test_accuracy", "test_nll", "warnings", *COMPARABLE)
#: configuration keys that never distinguish two runs' models (where they ran, how they logged)
_NOT_A_CHOICE = ("logger.", "trainer.resume", "trainer.progress", "trainer.num_threads", "trainer.device",
                 "data.root", "data.download", "data_info.")
FILES = ("report.json", "report.md", "report.png")


class ReportError(UserError):
    """Bad input of ``marglik-report``: no folder, no summaries, or an unreadable one."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    except OSError as e:
        raise ReportError(f"{path} cannot be read ({e.strerror or type(e).__name__})") from None


def _overrides(run_dir: Path) -> Optional[List[str]]:
    """The run's command-line overrides (Hydra's ``.hydra/overrides.yaml``), ``None`` if not a Hydra run."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # not YAML: the run is still ranked, without its overrides
        return None
    return rerun_overrides([str(v) for v in value]) if isinstance(value, list) else None


def _run_record(root: Path, summary_path: Path) -> Dict[str, Any]:
    summary = _read_json(summary_path)
    if not isinstance(summary, dict):
        raise ReportError(f"{summary_path} is not a marglik summary (not a JSON object)")
    missing = [k for k in REQUIRED if k not in summary]
    if missing:
        raise ReportError(f"{summary_path} is not a marglik summary (no {', '.join(missing)}; "
                          "written by another tool or an older marglik)")
    run_dir = summary_path.parent
    config_path = run_dir / "config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    lml = summary["log_marglik"]
    return {
        "run": str(run_dir.relative_to(root)) if run_dir != root else (root.resolve().name or str(root)),
        "overrides": _overrides(run_dir),  # without trainer.resume: see rerun_overrides
        "settings": {k: v for k, v in flatten(config).items() if not k.startswith(_NOT_A_CHOICE)},
        "log_marglik": lml if isinstance(lml, (int, float)) and math.isfinite(lml) else None,
        "log_marglik_per_example": summary["log_marglik_per_example"],
        "test_accuracy": summary["test_accuracy"],
        "test_nll": summary["test_nll"],
        "warnings": list(summary["warnings"]),
        "comparable": {k: summary[k] for k in COMPARABLE},
        "cost": _cost(summary),
    }


def _cost(summary: Dict[str, Any]) -> Dict[str, Any]:
    """A run's cost from ``summary.json['cost']`` (:func:`marglik.tuning.cost.cost_record`): seconds and
    standard trainings of the whole run, its marglik updates (hypersteps + selection) and its selection
    values; summaries written before the split have only ``seconds``."""
    c = summary.get("cost") or {}
    std = c.get("standard_trainings") or {}
    return {"seconds": c.get("seconds", summary.get("seconds")),
            "marglik_update_seconds": c.get("marglik_update_seconds"),
            "selection_seconds": c.get("selection_seconds"),
            "standard_trainings": std.get("total"),
            "marglik_update_standard_trainings": std.get("marglik_updates"),
            "selection_standard_trainings": std.get("selection")}


def _cost_cell(cost: Dict[str, Any], key: str) -> str:
    """``"12.3 s (2.41 std)"``: seconds and, where measured, standard trainings."""
    sec = cost.get("seconds" if key == "total" else f"{key}_seconds")
    std = cost.get("standard_trainings" if key == "total" else f"{key}_standard_trainings")
    if sec is None:
        return "-"
    return f"{sec:.3g} s" + (f" ({std:.2f} std)" if std is not None else "")


def _varied(runs: Sequence[Dict[str, Any]]) -> List[str]:
    """The configuration keys whose value differs between the runs."""
    keys = sorted({k for r in runs for k in r["settings"]})
    return [k for k in keys if len({json.dumps(r["settings"].get(k), sort_keys=True) for r in runs}) > 1]


def _label_choices(runs: Sequence[Dict[str, Any]], vary: Sequence[str]) -> None:
    """Set each run's ``choice``: its overrides that not every run shares (``model=cnn``), else the
    settings that vary (from ``config.json``), else its folder."""
    shared = set.intersection(*(set(r["overrides"] or []) for r in runs)) if runs else set()
    for r in runs:
        own = [o for o in (r["overrides"] or []) if o not in shared]
        if own:
            r["choice"] = " ".join(own)
        elif vary:
            r["choice"] = " ".join(f"{k}={json.dumps(r['settings'].get(k))}" for k in vary)
        else:
            r["choice"] = r["run"]


def _differences(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    return [f"{k}: {a[k]} vs {b[k]}" for k in COMPARABLE if a[k] != b[k]]


def build_report(root: Any) -> Dict[str, Any]:
    """Read every ``summary.json`` under ``root`` and rank the runs (the data of ``report.json``).

    Args:
        root: a run directory or a folder of runs (e.g. a Hydra multirun folder).

    Returns:
        ``{"root", "n_runs", "groups": [...], "flags": [...]}``; each group holds the runs of one
        data set, estimator and curvature, ``ranked`` best first by log marginal likelihood,
        ``unranked`` (no value), the ``best`` run, and the configuration keys that ``vary``.

    Raises:
        ReportError: ``root`` is not a folder, holds no ``summary.json``, or one that cannot be read.
    """
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root}: no such directory (give a run directory or a multirun folder)")
    paths = sorted(root.rglob("summary.json"))
    if not paths:
        raise ReportError(f"no summary.json under {root}: give a finished run directory or a folder of them "
                          "(e.g. the multirun/<date>/<time> folder of marglik -m ...)")
    runs = [_run_record(root, p) for p in paths]
    groups: List[Dict[str, Any]] = []
    for r in runs:
        group = next((g for g in groups if g["comparable"] == r["comparable"]), None)
        if group is None:
            group = {"comparable": r["comparable"], "runs": []}
            groups.append(group)
        group["runs"].append(r)
    groups.sort(key=lambda g: -len(g["runs"]))
    flags = []
    for i, g in enumerate(groups):
        members = g.pop("runs")
        ranked = sorted((r for r in members if r["log_marglik"] is not None), key=lambda r: -r["log_marglik"])
        for rank, r in enumerate(ranked, 1):
            r["rank"] = rank
        g.update(ranked=ranked, unranked=[r for r in members if r["log_marglik"] is None],
                 best=ranked[0]["run"] if ranked else None, vary=_varied(members))
        _label_choices(members, g["vary"])
        if i:
            flags.append(f"group {i + 1} ({len(members)} run{'s' if len(members) != 1 else ''}) is ranked apart from "
                         f"group 1, whose log marginal likelihoods are not comparable with it: "
                         + "; ".join(_differences(g["comparable"], groups[0]["comparable"])))
    return {"root": str(root), "n_runs": len(runs), "groups": groups, "flags": flags}


def _fmt(v: Any, spec: str) -> str:
    """``v`` formatted by ``spec``; a fixed-point ``spec`` switches to 4 significant digits (``1.599e+11``)
    for magnitudes of 10^5 and above or below 10^-3, where fixed point is unreadable or shows zeros."""
    if v is None:
        return "-"
    if spec.endswith("f") and isinstance(v, (int, float)) and v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return format(v, ".4g")
    return format(v, spec)


def rerun_overrides(overrides: Sequence[str]) -> List[str]:
    """A run's overrides without those that only say where it continued (``trainer.resume``,
    ``hydra.run.dir``): the command that makes the run again from scratch.

    Args:
        overrides: Hydra's ``overrides.yaml`` of the run.

    Returns:
        The overrides to repeat.
    """
    return [o for o in overrides if o.lstrip("+~").partition("=")[0] not in ("trainer.resume", "hydra.run.dir")]


def best_lines(report: Dict[str, Any]) -> List[str]:
    """One line per group naming its best run and configuration.

    Args:
        report: :func:`build_report`'s data.

    Returns:
        The lines (also the head of ``report.md``).
    """
    out = []
    for i, g in enumerate(report["groups"], 1):
        best = next((r for r in g["ranked"] if r["run"] == g["best"]), None)
        label = f"group {i}: " if len(report["groups"]) > 1 else ""
        if best is None:
            out.append(f"{label}no run has a log marginal likelihood (no marginal-likelihood update ran)")
            continue
        again = (f"rerun with: marglik {' '.join(rerun_overrides(best['overrides']))}".rstrip()
                 if best["overrides"] is not None
                 else "not a Hydra run: its config.json holds the configuration")
        out.append(f"{label}best of {len(g['ranked'])}: {best['choice']}, log marginal likelihood "
                   f"{_fmt(best['log_marglik'], '.6g')} ({_fmt(best['log_marglik_per_example'], '.4f')} per example), "
                   f"test accuracy {_fmt(best['test_accuracy'], '.3f')} (run {best['run']}; {again})"
                   + (f"; it has {len(best['warnings'])} warning(s), see report.md" if best["warnings"] else ""))
    return out


def render_markdown(report: Dict[str, Any]) -> str:
    """``report.md`` from :func:`build_report`'s data alone.

    Args:
        report: the data (as in ``report.json``).

    Returns:
        The markdown text.
    """
    lines = [f"# Model selection by log marginal likelihood: {report['n_runs']} runs under `{report['root']}`", ""]
    lines += [f"* **{line}**" for line in best_lines(report)]
    for flag in report["flags"]:
        lines.append(f"* **Not comparable:** {flag}")
    for i, g in enumerate(report["groups"], 1):
        c = g["comparable"]
        lines += ["", f"## Group {i}: {c['data']} (N={c['train_size']}, rotation {c['rotation']:g}, translation "
                      f"{c['translation']:g}), curvature {c['backend']} {c['structure']} {c['approx']}-"
                      f"{c['copies_approx'] or c['approx']}, {c['fisher_type']}", "",
                  f"Selection estimator: {c['selection_estimator']}. Hyperstep estimator: {c['marglik_estimator']}.",
                  f"Settings that vary: {', '.join(g['vary']) or 'none (only the run folders differ)'}.", "",
                  "| rank | run | choice | log ML | log ML / N | test acc. | test NLL | cost: total | marglik "
                  "updates | selection | warnings |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in g["ranked"] + g["unranked"]:
            warn = "; ".join(w[:80] for w in r["warnings"]) or ""
            cost = r.get("cost") or {}
            lines.append(f"| {r.get('rank', '-')} | `{r['run']}` | {r['choice']} | {_fmt(r['log_marglik'], '.6g')} "
                         f"| {_fmt(r['log_marglik_per_example'], '.4f')} | {_fmt(r['test_accuracy'], '.3f')} "
                         f"| {_fmt(r['test_nll'], '.3f')} | {_cost_cell(cost, 'total')} "
                         f"| {_cost_cell(cost, 'marglik_update')} | {_cost_cell(cost, 'selection')} | {warn} |")
    lines += ["", "Runs are ranked by their reported (selection) log marginal likelihood; test metrics are shown, "
              "not used. Runs with different data, estimators or curvature are ranked in separate groups. Cost: "
              "wall seconds of the run's training (all segments), of its marglik updates (hypersteps and selection "
              "values) and of its selection values, with the same in standard trainings (one epoch of the same "
              "network with fixed hyperparameters and one augmented copy, timed by the run, times its epochs) "
              "where the run measured one."]
    return "\n".join(lines) + "\n"


def plot_report(report: Dict[str, Any], path: Any) -> None:
    """``report.png``: log marginal likelihood per example and test accuracy of every ranked run, and
    the evidence against the run's cost (standard trainings where measured, else seconds), so a sweep
    such as ``curvature.approx=expand,reduce`` compares speed as well as evidence.

    Args:
        report: :func:`build_report`'s data.
        path: the image file.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [(i, r) for i, g in enumerate(report["groups"], 1) for r in g["ranked"]][::-1]
    fig = plt.figure(figsize=(16, 1.6 + 0.45 * max(len(rows), 4)))
    ax_l = fig.add_subplot(1, 3, 1)
    ax_a = fig.add_subplot(1, 3, 2, sharey=ax_l)
    ax_c = fig.add_subplot(1, 3, 3)
    ys = list(range(len(rows)))
    labels = [f"g{i} #{r['rank']} {r['choice']}"[:60] for i, r in rows]
    colors = [f"C{(i - 1) % 10}" for i, _ in rows]
    ax_l.barh(ys, [r["log_marglik_per_example"] or 0.0 for _, r in rows], color=colors)
    ax_l.set_title("log marginal likelihood / N (selects)")
    ax_a.barh(ys, [r["test_accuracy"] or 0.0 for _, r in rows], color=colors, alpha=0.6)
    ax_a.set_title("test accuracy (for reading)")
    ax_a.set_xlim(0, 1)
    ax_l.set_yticks(ys, labels, fontsize=8)
    if not rows:
        ax_l.text(0.5, 0.5, "no ranked run", ha="center", va="center", transform=ax_l.transAxes)
    in_std = bool(rows) and all((r.get("cost") or {}).get("standard_trainings") is not None for _, r in rows)
    for (_, r), color in zip(rows, colors):
        cost = r.get("cost") or {}
        x = cost.get("standard_trainings") if in_std else cost.get("seconds")
        if x is not None and r["log_marglik_per_example"] is not None:
            ax_c.scatter([x], [r["log_marglik_per_example"]], color=color)
            ax_c.annotate(f"#{r['rank']} {r['choice']}"[:40], (x, r["log_marglik_per_example"]), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
    ax_c.set_xlabel("run cost (standard trainings)" if in_std else "run cost (seconds)")
    ax_c.set_ylabel("log marginal likelihood / N")
    ax_c.set_title("evidence against cost")
    ax_c.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(root: Any) -> Dict[str, Any]:
    """Build the report of ``root`` and write ``report.json``, ``report.md`` and ``report.png`` there.

    Args:
        root: a run directory or a folder of runs.

    Returns:
        The report data.

    Raises:
        ReportError: as :func:`build_report`, or ``root`` is not writable.
    """
    report = build_report(root)
    out = Path(root)
    try:
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "report.md").write_text(render_markdown(report))
        plot_report(report, out / "report.png")
    except OSError as e:
        raise ReportError(f"cannot write the report into {out} ({e.strerror or type(e).__name__})") from None
    return report


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console script ``marglik-report DIR``.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="marglik-report",
        description="Rank the marglik runs under DIR by their log marginal likelihood (model selection over "
                    "architectures, augmentation families, ...); writes report.json, report.md and report.png into DIR. "
                    "Exit status 2 with one line for bad input.")
    parser.add_argument("dir", metavar="DIR", help="a run directory or a folder of runs (e.g. a Hydra multirun folder)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.dir)
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"marglik-report: error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)
    for line in best_lines(report):
        print(f"marglik-report: {line}")
    for flag in report["flags"]:
        print(f"marglik-report: warning: {flag}", file=sys.stderr)
    print(f"marglik-report: ranked {report['n_runs']} runs; wrote {', '.join(FILES)} to {args.dir}")


if __name__ == "__main__":
    main()
