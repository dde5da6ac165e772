#!/usr/bin/env bash
# One-command device check: tests that touch devices, the K-FAC and marglik benchmarks, the WRN-16-4
# cost-scaling, marglik-step and batchwise-memory benchmarks and a short WRN-16-4 tuning run on one
# device; writes results/*_<device>.*
# and prints a summary. On one GPU the full check takes at most ~8 minutes.
#
#   bash scripts/device_check.sh                         # cuda if available, else cpu; writes results/
#   bash scripts/device_check.sh --device cpu --quick    # smoke test on CPU (tiny models, ~3 min),
#                                                        # writes to $TMPDIR/marglik_device_check
#   bash scripts/device_check.sh --out DIR               # write the result files elsewhere
#   bash scripts/device_check.sh --only kfac,summary     # some steps only (tests, kfac, marglik, cost,
#                                                        # step, batchwise, tune, summary; default: all)
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEVICE=auto
QUICK=0
OUT=""
ONLY=all
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$1' (allowed: --device cpu|cuda|auto, --quick, --out DIR, --only STEPS)" >&2; exit 2 ;;
  esac
done
STEPS="tests kfac marglik cost step batchwise tune summary"
for s in ${ONLY//,/ }; do
  case " all $STEPS " in *" $s "*) ;; *) echo "device_check.sh: --only takes steps among: $STEPS (comma-separated), got '$s'" >&2; exit 2 ;; esac
done
want() { case ",$ONLY," in *,all,*|*",$1,"*) return 0 ;; *) return 1 ;; esac; }
if [ "$DEVICE" = auto ]; then
  DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
fi
case "$DEVICE" in cpu|cuda) ;; *) echo "device_check.sh: --device must be cpu, cuda or auto, got '$DEVICE'" >&2; exit 2 ;; esac
if [ -z "$OUT" ]; then
  if [ "$QUICK" = 1 ]; then OUT="${TMPDIR:-/tmp}/marglik_device_check"; else OUT="$ROOT/results"; fi
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TAG="_$DEVICE"
export WANDB_MODE=disabled PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
THREADS=$(nproc 2>/dev/null || echo 2)
step() { echo; echo "=== [$(date +%H:%M:%S)] $*"; }

step "device: $DEVICE, quick=$QUICK, results to $OUT"
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

if want tests; then
  step "tests that touch devices"
  "$PY" -m pytest -q tests/test_device.py
fi

if [ "$QUICK" = 1 ]; then
  # one thread each: a smoke test's timings mean nothing, and two threads on a busy 2-core machine
  # take 4x longer than one (bench_kfac: 112 s against 26 s at load average 10)
  KFAC_ARGS="--quick --batch-size 2 --repeats 1 --no-memory --threads 1"
  MARGLIK_ARGS="--quick --n-data 4 --batch-size 2 --repeats 1 --warmup 0 --threads 1"
  COST_ARGS="--quick --no-memory --threads 1"
  STEP_ARGS="--quick --threads 1"
  BATCHWISE_ARGS="--quick --threads 1"
  # quick: the small CNN on 16x16 (one WRN-16-4 marglik step alone takes minutes on a CPU)
  TUNE_MODEL="model=cnn data.upsample=16"
  TUNE_ARGS="data.train_size=16 trainer.num_threads=1 trainer.epochs=2 trainer.batch_size=8 hyper.burn_in=1 hyper.steps=1
             hyper.n_samples=2 hyper.marglik_batches=1 hyper.marglik_batch_size=8 trainer.eval_every=0"
else
  KFAC_ARGS="--repeats 5 --threads $THREADS"
  MARGLIK_ARGS="--repeats 10 --threads $THREADS"
  COST_ARGS="--threads $THREADS"
  STEP_ARGS="--threads $THREADS --repeats 3 --repeats-large 2"
  BATCHWISE_ARGS="--threads $THREADS --repeats 3 --batch 16 --copies 16 --batches 1 2 4"
  TUNE_MODEL="model=wrn16_4 data.upsample=32"
  # small batches for enough Adam steps, and a weak initial prior: under Adam a strong L2 term
  # shrinks the zero-initialised Fixup branches before they learn (results/wrn_marglik.md)
  TUNE_ARGS="data.train_size=1000 trainer.epochs=8 trainer.batch_size=16 trainer.lr=1e-3 hyper.burn_in=3
             hyper.steps=2 hyper.prior_prec_init=1e-3 hyper.lr=0.3 hyper.n_samples=8 hyper.marglik_batches=2
             hyper.marglik_batch_size=64"
fi

# bench SCRIPT DESCRIPTION ARGS...: one benchmark step, its output in $OUT/<script>$TAG.log (the tail shown
# and the check stopped when it fails)
bench() {
  local script=$1 desc=$2 log
  shift 2
  log="$OUT/${script%.py}$TAG.log"
  step "$script ($desc)"
  "$PY" "scripts/$script" --device "$DEVICE" --tag "$TAG" --out "$OUT" "$@" > "$log" 2>&1 \
    || { tail -20 "$log"; exit 1; }
}

if want kfac; then
  bench bench_kfac.py "K-FAC vs peers, vmapped vs loop backward" $KFAC_ARGS
fi

if want marglik; then
  bench bench_marglik.py "log marglik + gradient vs laplace-torch" $MARGLIK_ARGS
fi

if want cost; then
  bench bench_wrn_cost.py "one marglik step vs augmented copies" $COST_ARGS
fi

if want step; then
  bench bench_marglik_step.py "one WRN-16-4 marglik step vs laplace-torch, breakdown, floor" $STEP_ARGS
fi

if want batchwise; then
  bench bench_batchwise.py "one-pass vs batchwise learned-augmentation step: memory and time" $BATCHWISE_ARGS
fi

if want tune; then
  step "short tuning run ($TUNE_MODEL, rotated digits, learned augmentation, K-FAC-reduce)"
  RUN="$OUT/wrn_tuning$TAG"
  rm -rf "$RUN"
  "$PY" -m marglik $TUNE_MODEL data.rotation=90 trainer.device="$DEVICE" logger.mode=disabled \
    $TUNE_ARGS hydra.run.dir="$RUN" > "$OUT/wrn_tuning$TAG.log" 2>&1 \
    || { tail -20 "$OUT/wrn_tuning$TAG.log"; exit 1; }
  cp "$RUN/summary.json" "$OUT/wrn_tuning$TAG.json"
fi

if ! want summary; then echo; echo "device_check: steps $ONLY OK ($DEVICE), results in $OUT"; exit 0; fi
step "summary"
"$PY" - "$OUT" "$TAG" <<'PYEOF'
import json, sys
from pathlib import Path
out, tag = Path(sys.argv[1]), sys.argv[2]
k = json.loads((out / f"kfac_speed{tag}.json").read_text())
print(f"K-FAC ({k['setup']['device_name']}):")
for key, v in k["ratios"].items():
    if any(s in key for s in ("marglik/curvlinops", "backward mode", "expand/reduce")):
        print(f"  {key}: {v:.2f}")
m = json.loads((out / f"marglik_speed{tag}.json").read_text())
for setting, block in m["settings"].items():
    sp = block["results"]["marglik (separate bias)"]["speedup_vs_laplace_torch"]
    print(f"log marglik + grad, {setting}: marglik {sp:.2f}x faster than laplace-torch")
c = json.loads((out / f"wrn_cost{tag}.json").read_text())
for r in c["ratios"]:
    extra = "".join(f", marglik/peer {a} {r[f'marglik_over_peer_{a}']:.2f}" for a in ("expand", "reduce")
                    if f"marglik_over_peer_{a}" in r)
    beyond = r.get("reduce_beyond_ggn_backward_mib")
    extra += "" if beyond is None else f", reduce MiB beyond the GGN backward passes {beyond:+.0f}"
    print(f"marglik step B={r['batch_size']} S={r['copies']}: expand/reduce {r['expand_over_reduce']:.2f}, "
          f"mixed/reduce {r['mixed_over_reduce']:.2f}{extra}")
st = json.loads((out / f"marglik_step_wrn{tag}.json").read_text())
for setting in st["settings"]:
    r = setting["ratios"]
    label = f"n={setting['n']}" + (f" S={setting['copies']}" if setting["augment"] else "")
    keys = [k for k in ("reduce/laplace-torch reduce", "reduce/expand", "marglik-reduce/floor",
                        "reduce-reduce/expand-reduce", "marglik-reduce-reduce/floor") if k in r]
    print(f"marglik step {label}: " + ", ".join(f"{k} {r[k]:.2f}" for k in keys))
b = json.loads((out / f"batchwise{tag}.json").read_text())
for r in b["rows"]:
    mem, sec = r["peak_extra_bytes"], r["seconds"]
    mem_ratio = "-" if any(isinstance(v, str) for v in mem.values()) else f"{mem['batchwise'] / mem['one-pass']:.2f}"
    print(f"batchwise step, {r['images']} augmented images: memory batchwise/one-pass {mem_ratio}, "
          f"time {sec['batchwise'] / sec['one-pass']:.2f}")
s = json.loads((out / f"wrn_tuning{tag}.json").read_text())
print("WRN tuning run:", {key: s.get(key) for key in ("test_accuracy", "test_nll", "log_marglik", "seconds")})
PYEOF
echo
echo "device_check: OK ($DEVICE), results in $OUT"
