"""``scripts/bench_wrn_cost.py --append``: a grid measured in sittings keeps the other sittings' batch
sizes (rows, ratios, load averages) and replaces the ones measured again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _bench():
    if str(SCRIPTS) not in sys.path:  # the scripts import their siblings, as when run directly
        sys.path.insert(0, str(SCRIPTS))
    import bench_wrn_cost

    return bench_wrn_cost


def test_append_keeps_the_other_batch_sizes(tmp_path):
    mod = _bench()
    quick = ["--quick", "--no-memory", "--threads", "1", "--out", str(tmp_path)]  # S in {1, 2}
    mod.main(quick + ["--batch-sizes", "2"])
    first = json.loads((tmp_path / "wrn_cost.json").read_text())
    mod.main(quick + ["--batch-sizes", "3", "--append"])
    both = json.loads((tmp_path / "wrn_cost.json").read_text())
    assert {r["batch_size"] for r in both["rows"]} == {2, 3}
    # the first sitting's rows are kept as they were
    assert [r for r in both["rows"] if r["batch_size"] == 2] == first["rows"]
    assert [(r["batch_size"], r["copies"]) for r in both["ratios"]] == [(2, 1), (2, 2), (3, 1), (3, 2)]
    assert "marglik_over_peer_reduce" in both["ratios"][2] and "marglik_over_peer_reduce" not in both["ratios"][3]
    assert [st["batch_sizes"] for st in both["meta"]["sittings"]] == [[2], [3]]
    md = (tmp_path / "wrn_cost.md").read_text()
    assert "B = 2: " in md and "B = 3: " in md and "--batch-sizes 2 3" in md
    # measuring B = 2 again replaces its rows and its sitting; without --append only this sitting's rows remain
    mod.main(quick + ["--batch-sizes", "2", "--append"])
    again = json.loads((tmp_path / "wrn_cost.json").read_text())
    assert [st["batch_sizes"] for st in again["meta"]["sittings"]] == [[3], [2]]
    assert [r["batch_size"] for r in again["ratios"]] == [2, 2, 3, 3]
    mod.main(quick + ["--batch-sizes", "3"])
    alone = json.loads((tmp_path / "wrn_cost.json").read_text())
    assert {r["batch_size"] for r in alone["rows"]} == {3}
