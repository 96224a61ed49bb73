#!/usr/bin/env bash
# The prepared GPU check: one script, one GPU, under 8 minutes, everything in one folder.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine (wheels from .whl/, see gpu_wheels.sh)
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # here: every step on the CPU at tiny sizes, to prove the script
#
# Writes to $OUT if set (the device machine's return folder), else ./gpu_check_out: summary.md (targets,
# numbers, verdicts, what each step did), check.log (this script's output) and details.tar.gz (each
# step's JSON, log and stderr, junit.xml, nvidia-smi samples, the sonar sweep's MLflow store). Steps:
#   install   the carried wheels into a private site folder (pip --no-index; nothing is fetched)
#   env       nvidia-smi, Python, torch and CUDA versions, and whether optuna and mlflow import
#   tests     the engine's CUDA equivalence tests (GPU_CHECK_TESTS: pytest arguments) -> junit.xml
#   baseline  the plain one-model DataLoader loop on the GPU and on one CPU core
#   micro     fold-fit epochs/s of fit_many at 5, 125, 625 and 3,125 sonar-sized models, eager and captured
#   sonar     `foldsweep run sweeps/sonar.yaml` end to end, GPU utilisation sampled every 200 ms
#   summary   summary.md (benchmarks/gpu_summary.py: standard library only, so it reports any failure)
# Each step has its own time limit, clipped to what is left of GPU_CHECK_BUDGET_S (default 420 s, three
# times that and each limit in the dry run); a step that fails or runs out of time is recorded and the
# next one runs.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
DRY=0
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
DIR=${OUT:-$ROOT/gpu_check_out}
D=$DIR/details
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
# the engine's CUDA equivalence tests, by marker (`@pytest.mark.cuda`); any pytest arguments work here
read -r -a TESTS <<<"${GPU_CHECK_TESTS:-tests -m cuda}"
if ((DRY)); then
  PY=${PYTHON:-$ROOT/.venv/bin/python}
  export OMP_NUM_THREADS=1  # a shared CPU machine
  SIZES=5,25 EPOCHS=10 FITS=1 DEV=cpu
  SCALE=3  # step limits x3: on 2 shared cores the imports alone take half a minute
  SONAR_SET=(--set optuna.n_trials=3 --set optuna.trials_per_batch=3 --set train.epochs=10 --set split.outer.k=2
             --set split.inner.k=2 --set resources.devices=cpu --set resources.workers=1)
else
  PY=${PYTHON:-python3}
  SIZES=5,125,625,3125 EPOCHS=100 FITS=3 DEV=cuda
  SCALE=1
  SONAR_SET=()
fi
BUDGET_S=${GPU_CHECK_BUDGET_S:-$((420 * SCALE))}
DEADLINE=$(($(date +%s) + BUDGET_S))
rm -rf "$DIR/details" "$DIR/summary.md" "$DIR/details.tar.gz"
mkdir -p "$D"
exec > >(tee "$DIR/check.log") 2>&1
: >"$D/steps.tsv"

# step NAME LIMIT_S NOTE CMD...: run CMD (stdout -> NAME.out, stderr -> NAME.err) within LIMIT_S x SCALE,
# clipped to the budget left; record rc, seconds and NOTE in steps.tsv; return CMD's rc.
step() {
  local name=$1 limit=$(($2 * SCALE)) note=$3
  shift 3
  local left=$((DEADLINE - $(date +%s)))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    skip "$name" "no time left in the ${BUDGET_S} s budget"
    return 124
  fi
  echo "== $name (limit ${limit} s): $*"
  local t0 rc ms
  t0=$(date +%s%N)
  timeout -k 10 "$limit" "$@" >"$D/$name.out" 2>"$D/$name.err"
  rc=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  printf '%s\t%s\t%d.%d\t%s\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000 / 100)) "$note" >>"$D/steps.tsv"
  tail -n 15 "$D/$name.out"
  ((rc != 0)) && { echo "-- $name failed (rc $rc), stderr ends:"; tail -n 15 "$D/$name.err"; }
  return $rc
}
skip() {
  echo "== $1 SKIPPED: $2"
  printf '%s\t-\t0\t%s\n' "$1" "$2" >>"$D/steps.tsv"
}

# install: the wheels go to a private folder; on the GPU machine it goes first on PYTHONPATH. Here (Python
# 3.11, wheels for 3.12) the same install runs for 3.12's tags, to prove the set installs together, and the
# venv, which holds the same versions, runs the rest.
PIP=(-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site")
if ((DRY)); then
  PIP+=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
fi
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  step install 90 "$(ls "$ROOT"/.whl/*.whl | wc -l) wheels from .whl/" "$PY" "${PIP[@]}" "$ROOT"/.whl/*.whl
  ((DRY)) || export PYTHONPATH=$WORK/site
else
  skip install "no .whl/ folder: run benchmarks/gpu_wheels.sh here and carry .whl"
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$ROOT/src:$ROOT/benchmarks
export PYTHONUNBUFFERED=1

if command -v nvidia-smi >/dev/null; then
  step nvidia-smi 20 "" nvidia-smi
else
  skip nvidia-smi "no nvidia-smi on this machine"
fi
step env 60 "" "$PY" "$ROOT/benchmarks/gpu_check.py" env "$D/env.json"
if "$PY" -c "import mlflow, optuna, sqlalchemy" 2>"$D/import-probe.err"; then
  TRACKING=(); echo "tracking on: MLflow into the sweep's SQLite store" >"$D/tracking.txt"
else
  TRACKING=(--set tracking.enabled=false)
  echo "tracking OFF: mlflow did not import ($(tail -n 1 "$D/import-probe.err"))" >"$D/tracking.txt"
fi
cat "$D/tracking.txt"

step tests 90 "pytest ${TESTS[*]}" "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors \
  --junitxml "$D/junit.xml" "${TESTS[@]}"
if ((DRY)); then
  skip baseline_gpu "the dry run has no GPU"
else
  step baseline_gpu 60 "" "$PY" "$ROOT/benchmarks/gpu_check.py" baseline "$D/baseline_gpu.json" --device cuda \
    --epochs "$EPOCHS" --fits "$FITS"
fi
step baseline_cpu 60 "one torch thread" "$PY" "$ROOT/benchmarks/gpu_check.py" baseline "$D/baseline_cpu.json" \
  --device cpu --epochs "$EPOCHS" --fits "$FITS"
# micro keeps what it measured if stopped at its limit (it writes after every size), so it goes before sonar
# with a limit that leaves sonar its time in the budget
step micro 120 "sizes $SIZES, $EPOCHS epochs" "$PY" "$ROOT/benchmarks/gpu_check.py" micro "$D/micro.json" \
  --sizes "$SIZES" --epochs "$EPOCHS" --device "$DEV"

# sonar: in a fresh working folder (its own mlruns/), nvidia-smi sampling in the background meanwhile
mkdir -p "$WORK/sonar"
cd "$WORK/sonar" || exit 1
SAMPLER=""
if command -v nvidia-smi >/dev/null && ((!DRY)); then
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -lms 200 >"$D/gpu_util.csv" &
  SAMPLER=$!
fi
step sonar 150 "$(cat "$D/tracking.txt")" "$PY" -m foldsweep run "$ROOT/sweeps/sonar.yaml" --json \
  "${SONAR_SET[@]}" "${TRACKING[@]}"
[[ -n "$SAMPLER" ]] && kill "$SAMPLER"
[[ -z "$SAMPLER" ]] && echo "no GPU utilisation samples: $( ((DRY)) && echo "dry run" || echo "no nvidia-smi")"
if [[ -f mlruns/mlflow.db ]]; then
  cp mlruns/mlflow.db "$D/mlflow.db"
  step mlflow 30 "system metrics of the sweep's MLflow store" "$PY" "$ROOT/benchmarks/gpu_summary.py" mlflow \
    mlruns/mlflow.db "$D/mlflow.json"
fi
cd "$ROOT" || exit 1

# summary: always runs, outside the budget
"$PY" "$ROOT/benchmarks/gpu_summary.py" summary "$DIR" $( ((DRY)) && echo --dry-run) || echo "summary failed"
tar -czf "$DIR/details.tar.gz" -C "$DIR" details
if (($(stat -c %s "$DIR/details.tar.gz") > 15 * 1048576)); then  # the device returns files up to 16 MiB
  tar -czf "$DIR/details.tar.gz" -C "$DIR" --exclude details/mlflow.db details
  echo "details.tar.gz left out mlflow.db (over 15 MiB packed)"
fi
[[ -n "${OUT:-}" ]] && rm -rf "$D"  # the device machine returns at most 8 files
rm -rf "$WORK"
echo "gpu_check: done in $(($(date +%s) - DEADLINE + BUDGET_S)) s; results in $DIR"
