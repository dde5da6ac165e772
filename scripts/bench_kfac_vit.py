"""K-FAC speed on torchvision's VisionTransformer: expand vs reduce, marglik vs curvlinops.

The same benchmark as ``python scripts/bench_kfac.py --vit`` (the code lives in ``kfac_vit.py``);
writes ``results/kfac_speed_vit{--tag}.{md,json}``; ``--from-json`` re-renders the markdown from
the JSON alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchlib import RESULTS
from kfac_vit import STEM, run, to_markdown
from runner import rerender


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="", help="suffix for the result files (e.g. _h100)")
    ap.add_argument("--from-json", action="store_true", help="only re-render <out>/kfac_speed_vit<tag>.md from its JSON")
    args = ap.parse_args(argv)
    if args.from_json:
        return rerender(Path(args.out), f"{STEM}{args.tag}", to_markdown)
    return run(args.batch_size, args.repeats, args.threads, args.device, args.out, args.tag)


if __name__ == "__main__":
    main()
