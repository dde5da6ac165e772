#!/usr/bin/env bash
# Render pages of the built documentation to PNG with headless Chromium, to look at them as a reader
# would (docs/README.md). Build the site first:
#   sphinx-build -W --keep-going -b html docs docs/_build/html
#   bash scripts/docs_screenshots.sh [OUT_DIR]        # default OUT_DIR: docs/_build/screenshots
# Renders the index, a gallery page and an API page (plus getting started and the CLI reference),
# each at 1280 px wide and as tall as given below. Needs Debian's `chromium` package
# (apt-get install -y chromium); CHROMIUM=<binary> picks another.
set -euo pipefail
cd "$(dirname "$0")/.."
HTML=docs/_build/html
OUT=${1:-docs/_build/screenshots}
BROWSER=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
if [ -z "$BROWSER" ]; then
  echo "docs_screenshots.sh: no chromium found: apt-get install -y chromium (or set CHROMIUM=...)" >&2
  exit 2
fi
if [ ! -f "$HTML/index.html" ]; then
  echo "docs_screenshots.sh: $HTML/index.html missing: build the docs first (see the header of this script)" >&2
  exit 2
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# page (relative to the site), PNG name, height in px
PAGES=(
  "index.html index 1100"
  "getting_started.html getting_started 2200"
  "auto_examples/plot_marglik_vs_prior.html gallery_marglik_vs_prior 2600"
  "auto_examples/index.html gallery_index 1300"
  "reference/api.html api 2400"
  "reference/cli.html cli 1800"
  "results/marglik_vs_grid.html results_marglik_vs_grid 2400"
)
for entry in "${PAGES[@]}"; do
  read -r page name height <<<"$entry"
  "$BROWSER" --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
    --window-size=1280,"$height" --screenshot="$OUT/$name.png" "file://$PWD/$HTML/$page" >/dev/null 2>&1 || true
  if [ ! -s "$OUT/$name.png" ]; then
    echo "docs_screenshots.sh: chromium wrote no $OUT/$name.png for $page" >&2
    exit 1
  fi
  echo "$OUT/$name.png  <- $page"
done
