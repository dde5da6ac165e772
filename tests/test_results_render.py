"""The committed reports come from their JSON alone: every ``results/<stem>.md`` equals what its
generator's renderer (the one ``--from-json`` uses) writes from ``results/<stem>.json``, and no
result JSON holds an absolute (machine) path."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
SCRIPTS = ROOT / "scripts"

#: result stem -> (module in scripts/, its JSON -> markdown function)
RENDERERS = {
    "batchwise": ("bench_batchwise", "render"),
    "invariance_digits": ("run_invariance", "render"),
    "kfac_speed": ("bench_kfac", "to_markdown"),
    "kfac_speed_backpack": ("bench_kfac", "backpack_markdown"),
    "kfac_speed_vit": ("kfac_vit", "to_markdown"),
    "laplace_torch_subsets": ("check_laplace_torch_subsets", "render"),
    "marglik_speed": ("bench_marglik", "render"),
    "marglik_step_wrn": ("bench_marglik_step", "render"),
    "marglik_vs_grid": ("bench_vs_grid", "render"),
    "model_zoo": ("bench_model_zoo", "render"),
    "optimizer_steps_to_target": ("optbench_report", "render_markdown"),
    "reduce_invariance": ("reduce_invariance", "render"),
    "optimizer_steps_to_target_tvvit": ("optbench_report", "render_markdown"),
    "selection_digits": ("run_selection_digits", "render"),
    "tuning_backends": ("run_tuning_backends", "to_markdown"),
    "vit_digits_cli": ("run_vit_digits", "render"),
    "wrn_cost": ("bench_wrn_cost", "render"),
    "wrn_marglik": ("run_wrn_marglik", "render"),
    "wrn_rotation_terms": ("wrn_rotation_terms", "render"),
}


def _renderer_of(stem: str):
    """The registered renderer of ``stem``, or of ``stem`` without a device tag (``kfac_speed_cuda``)."""
    if stem in RENDERERS:
        return RENDERERS[stem]
    base = stem.rsplit("_", 1)[0]
    return RENDERERS.get(base)


def _reports():
    """Every committed JSON that has a markdown report next to it."""
    return sorted(p.stem for p in RESULTS.glob("*.json") if p.with_suffix(".md").exists())


def test_every_report_has_a_renderer():
    missing = [s for s in _reports() if _renderer_of(s) is None]
    assert not missing, f"results with a markdown report but no renderer registered here: {missing}"


@pytest.mark.parametrize("stem", _reports())
def test_markdown_is_rendered_from_the_json_alone(stem, tmp_path):
    entry = _renderer_of(stem)
    if entry is None:
        pytest.skip("no renderer")
    if str(SCRIPTS) not in sys.path:  # the scripts import their siblings (benchlib, runner), as when run directly
        sys.path.insert(0, str(SCRIPTS))
    module, fn = entry
    render = getattr(importlib.import_module(module), fn)
    # a copy of the JSON alone in a fresh folder: nothing else the renderer could read
    data = json.loads((RESULTS / f"{stem}.json").read_text())
    (tmp_path / f"{stem}.json").write_text(json.dumps(data))
    md = render(json.loads((tmp_path / f"{stem}.json").read_text()))
    assert md == (RESULTS / f"{stem}.md").read_text(), f"results/{stem}.md differs from its JSON's rendering"


_ABSOLUTE = re.compile(r"(?:^|[\s=:'\"(])(?:/(?:work|tmp|home|root|Users|mnt|scratch|var|private|opt|data)/"
                       r"|[A-Za-z]:\\)")


def _strings(x):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _strings(v)
    elif isinstance(x, str):
        yield x


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_no_absolute_paths_in_results(path):
    bad = [s for s in _strings(json.loads(path.read_text())) if s.startswith("/") or _ABSOLUTE.search(s)]
    assert not bad, f"{path.name} holds absolute paths (store them relative to the repository): {bad[:3]}"
