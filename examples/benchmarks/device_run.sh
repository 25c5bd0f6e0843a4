#!/usr/bin/env bash
# The one prepared command for a GPU machine: the three benchmarks, then the study, everything under $OUT.
#
#   bash examples/benchmarks/device_run.sh              # on the device machine (docs/study.md: how to call it)
#   bash examples/benchmarks/device_run.sh --rehearse   # here, on the CPU: synthetic, 32², 1 epoch, 2 seeds
#
# The device machine has python3 with torch, torchvision, timm, scipy, pillow, tqdm, but no
# segmentation_models_pytorch and no network: the smp wheel travels in runs/wheels/ (carried) and is installed into
# a private folder; adst_plugin is imported from the working tree and examples/ as the package adst_examples.
# The dataset caches travel in runs/cache/ (carried; built here by study.py, 37 MiB for BUSI + Kvasir at 256²).
# Both folders are under the ignored runs/, so they are never committed by accident.
#
# What comes back (at most 8 files, flat under $OUT): env.txt, bench_train_overhead.txt, bench_inference.txt,
# bench_targets.txt, study.log, study.json, study.md, study_runs.tar.gz (every run's result.json).
#
# Settings (environment): LIMIT_S (whole script, default 570 s; rehearsal 480 s), DATASETS, ARMS, SEEDS, EPOCHS,
# IMG_SIZE, PARALLEL (a number, or "measure"), STUDY_ARGS (extra study.py flags), CACHE_DIR, WHEELS_DIR,
# STUDY_DIR, PYTHON, ADST_REHEARSE=1 (same as --rehearse), EXECUTOR (auto, local or ray).
#
# Several GPUs (nvidia-smi -L): the study runs on all of them through a local Ray instance (--executor ray, one
# run per GPU, or PARALLEL runs per GPU when PARALLEL is a number), if ray imports or installs from WHEELS_DIR
# (pip download ray -d runs/wheels); otherwise it says so and runs on one GPU. EXECUTOR=ray forces the Ray
# executor (also in the rehearsal, on the CPU), EXECUTOR=local the worker processes on one device.
set -uo pipefail

REHEARSE=${ADST_REHEARSE:-0}
[[ "${1:-}" == "--rehearse" ]] && REHEARSE=1
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/runs/device-out}
mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $((LIMIT_S - ($(date +%s) - T0))); }

if [[ $REHEARSE == 1 ]]; then
    LIMIT_S=${LIMIT_S:-480}  # generous: a loaded 2-core CI machine must not cut the rehearsal short
    DEVICE=cpu
    DATASETS=${DATASETS:-synthetic}
    ARMS=${ARMS:-baseline,adst}
    SEEDS=${SEEDS:-2}
    EPOCHS=${EPOCHS:-1}
    IMG_SIZE=${IMG_SIZE:-32}
    PARALLEL=${PARALLEL:-measure}  # the device's code path: worker processes, measured N
    STUDY_ARGS=${STUDY_ARGS:-"--synthetic-n 16 --max-steps 1 --batch-size 4 --encoder resnet18 \
        --parallel-candidates 1,2 --bench-steps 2"}
    BENCH_TRAIN=(--device cpu --encoder resnet18 --size 32 --batch 2 --steps 1 --warmup 1)
    BENCH_INFER=(--device cpu --encoder resnet18 --size 32 --batch 2 --steps 1 --warmup 1)
    BENCH_TARGETS=(--device cpu --sizes 32 --batches 1 --repeats 1 --masks 4 --no-polygon)
    BENCH_LIMIT=120
else
    LIMIT_S=${LIMIT_S:-570}
    DEVICE=cuda
    DATASETS=${DATASETS:-busi,kvasir}
    ARMS=${ARMS:-baseline,adst,paper,legacy}
    SEEDS=${SEEDS:-5}
    EPOCHS=${EPOCHS:-busi=50,kvasir=40}
    IMG_SIZE=${IMG_SIZE:-256}
    PARALLEL=${PARALLEL:-measure}
    STUDY_ARGS=${STUDY_ARGS:-"--arch unet --encoder resnet34"}
    BENCH_TRAIN=(--device cuda --amp bf16 --size 256 --batch 8)
    BENCH_INFER=(--device cuda --size 256 --batch 8)
    BENCH_TARGETS=(--device cuda --sizes 256 512 --batches 1 32)
    BENCH_LIMIT=45
fi
CACHE_DIR=${CACHE_DIR:-$ROOT/runs/cache}
WHEELS_DIR=${WHEELS_DIR:-$ROOT/runs/wheels}

# --- environment: smp from the carried wheels, adst_examples from the tree ----------------------------------------
SITE=$(mktemp -d /tmp/adst_site.XXXXXX)
if ! "$PY" -c "import segmentation_models_pytorch" 2>/dev/null; then
    if compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS_DIR"/*.whl ||
            exit 1
    else
        echo "device_run.sh: segmentation_models_pytorch is missing and no wheels were carried in $WHEELS_DIR" >&2
        exit 1
    fi
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import adst_examples" 2>/dev/null; then
    ln -s "$ROOT/examples" "$SITE/adst_examples"
fi
export PYTHONUNBUFFERED=1

# --- executor: Ray over every GPU when there are several ---------------------------------------------------------
EXECUTOR=${EXECUTOR:-auto}
NGPU=0
[[ $REHEARSE != 1 ]] && command -v nvidia-smi >/dev/null && NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
if [[ $EXECUTOR == auto ]]; then
    EXECUTOR=local
    ((NGPU > 1)) && EXECUTOR=ray
fi
if [[ $EXECUTOR == ray ]] && ! "$PY" -c "import ray" 2>/dev/null; then
    if compgen -G "$WHEELS_DIR/ray-*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --find-links "$WHEELS_DIR" --no-compile --no-cache-dir --target "$SITE" ray
    fi
    if ! "$PY" -c "import ray" 2>/dev/null; then
        echo "device_run.sh: $NGPU GPUs, but ray is neither installed nor in $WHEELS_DIR: the study runs on one GPU"
        EXECUTOR=local
    fi
fi
echo "device_run.sh: $NGPU GPUs, executor $EXECUTOR"

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "rehearse: $REHEARSE"
    "$PY" - <<'EOF'
import platform, torch, segmentation_models_pytorch as smp, adst_plugin
print("python", platform.python_version(), "| torch", torch.__version__, "| smp", smp.__version__,
      "| adst_plugin", adst_plugin.__version__)
print("cuda:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    git -C "$ROOT" log -1 --format='commit: %H %s' 2>/dev/null
    git -C "$ROOT" status --short 2>/dev/null | head -20
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# --- benchmarks first, on the idle device ---------------------------------------------------------------------------
bench() {
    local name=$1
    shift
    echo "== $name $*"
    timeout "$BENCH_LIMIT" "$PY" "examples/benchmarks/$name.py" "$@" >"$OUT/bench_$name.txt" 2>&1
    local rc=$?
    echo "exit: $rc" >>"$OUT/bench_$name.txt"
    tail -n 25 "$OUT/bench_$name.txt"
}
bench train_overhead "${BENCH_TRAIN[@]}"
bench inference "${BENCH_INFER[@]}"
bench targets "${BENCH_TARGETS[@]}"

# --- the study: whatever time is left, minus a margin for the report and the archive -------------------------------
STUDY_DIR=${STUDY_DIR:-$(mktemp -d /tmp/adst_study.XXXXXX)}
REMAIN=$(left)
BUDGET_S=$((REMAIN - 40))
if ((BUDGET_S < 30)); then
    echo "device_run.sh: only ${REMAIN}s left, no study" | tee "$OUT/study.log"
    exit 1
fi
BUDGET_MIN=$(awk "BEGIN { printf \"%.2f\", $BUDGET_S / 60 }")
if [[ $EXECUTOR == ray ]]; then  # Ray asks each run for 1/N of a GPU: N is given, not measured
    PAR=(--executor ray --parallel "${PARALLEL/measure/1}")
elif [[ $PARALLEL == measure ]]; then
    PAR=(--measure-parallel)
else
    PAR=(--parallel "$PARALLEL")
fi
# shellcheck disable=SC2086  # STUDY_ARGS is a list of flags
CMD=("$PY" examples/study.py --datasets "$DATASETS" --arms "$ARMS" --seeds "$SEEDS" --epochs "$EPOCHS"
    --img-size "$IMG_SIZE" --device "$DEVICE" --cache-dir "$CACHE_DIR" --out "$STUDY_DIR" --budget-min "$BUDGET_MIN"
    "${PAR[@]}" $STUDY_ARGS)
echo "== ${CMD[*]}" | tee "$OUT/study.log"
timeout $((REMAIN - 10)) "${CMD[@]}" >>"$OUT/study.log" 2>&1
STUDY_RC=$?
echo "exit: $STUDY_RC" >>"$OUT/study.log"
tail -n 60 "$OUT/study.log"
cp "$STUDY_DIR/study.json" "$STUDY_DIR/study.md" "$OUT/" 2>/dev/null
tar czf "$OUT/study_runs.tar.gz" -C "$STUDY_DIR" . 2>/dev/null
echo "device_run.sh: done in $(($(date +%s) - T0)) s (study exit $STUDY_RC); files in $OUT:"
ls -la "$OUT"
exit "$STUDY_RC"
