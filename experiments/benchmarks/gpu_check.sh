#!/usr/bin/env bash
# One-shot GPU check (issue 13): environment, device tests, sync audit, GPU benchmark.
#
#   OUT=/some/folder bash experiments/benchmarks/gpu_check.sh
#
# Run from the repository root on a machine with an NVIDIA GPU. Creates .venv the
# way `make env` does (torch/torchvision pinned first, then the package with its
# extras, here test and bench; wheels in .whl/ are used when that folder exists)
# unless a working one is there. Leaves at most 7 files in $OUT (default
# results/gpu_check), none in sub-folders: log.txt (every step's tail and the
# tables), pytest_devices.txt, sync_audit.json, bench_3c3d.md/.csv and
# bench_resnet18.md/.csv; raw measurements stay in results/gpu_check_work.
# Every step has its own time limit, capped by what is left of TOTAL seconds
# (default 450), so the whole script stays within about 8 minutes; a failing
# step is logged and the next one still runs.
set -u
OUT="${OUT:-results/gpu_check}"
TOTAL="${TOTAL:-450}"
# dry run elsewhere: NO_INSTALL=1 DEVICE=cpu SIZES_3C3D=8 SIZES_RESNET18=2
DEVICE="${DEVICE:-cuda}"
SIZES_3C3D="${SIZES_3C3D:-64,256}"
SIZES_RESNET18="${SIZES_RESNET18:-8,32}"
WORK=results/gpu_check_work
mkdir -p "$OUT" "$WORK"
LOG="$OUT/log.txt"
PY=.venv/bin/python
START=$(date +%s)
export MPLBACKEND=agg PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1

log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
step() {  # step NAME SECONDS COMMAND...: run with min(SECONDS, time left)
    local name=$1 limit=$2 left status
    shift 2
    left=$(( TOTAL - ($(date +%s) - START) ))
    (( left < limit )) && limit=$left
    if (( limit < 15 )); then log "skip $name: no time left"; return; fi
    log "start $name (limit ${limit}s): $*"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$WORK/$name.txt" 2>&1
    status=$?
    tail -n 15 "$WORK/$name.txt" >>"$LOG"
    log "end $name: exit $status"
}

log "host $(hostname); $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
CHECK="import torch, vivitlib, vivit; assert '$DEVICE' == 'cpu' or torch.cuda.is_available()"
if [ "${NO_INSTALL:-0}" != 1 ] && ! $PY -c "$CHECK" 2>/dev/null; then
    LINKS=""
    [ -d .whl ] && LINKS="--find-links .whl"
    step install 240 bash -c "
        set -e
        python3 -m venv .venv
        .venv/bin/python -m pip install --quiet --upgrade pip $LINKS
        .venv/bin/python -m pip install --quiet $LINKS torch==2.14.1 torchvision==0.29.1
        .venv/bin/python -m pip install --quiet $LINKS -e '.[test,bench]'"
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.is_available() and torch.cuda.get_device_name(0))" >>"$LOG" 2>&1

step pytest_devices 80 $PY -m pytest tests/devices -q -p no:cacheprovider -rA
cp "$WORK/pytest_devices.txt" "$OUT/" 2>/dev/null

step sync_audit 40 $PY -m experiments.benchmarks.ggn.sync_audit --problem 3c3d \
    --batch-size 64 --out "$OUT/sync_audit.json"

BENCH=(-m experiments.benchmarks.ggn.run --device "$DEVICE" --configs eigvals newton
       --no-critical --force)
step bench_3c3d 150 $PY "${BENCH[@]}" --repeats 3 --problems 3c3d \
    --sizes "3c3d=$SIZES_3C3D" --out "$WORK/bench_3c3d"
step bench_resnet18 150 $PY "${BENCH[@]}" --repeats 2 --problems resnet18 \
    --sizes "resnet18=$SIZES_RESNET18" --out "$WORK/bench_resnet18"
for name in bench_3c3d bench_resnet18; do
    for ext in md csv; do
        [ -f "$WORK/$name/results.$ext" ] && cp "$WORK/$name/results.$ext" "$OUT/$name.$ext"
    done
    [ -f "$OUT/$name.md" ] && cat "$OUT/$name.md" >>"$LOG"
done
log "done"
