#!/usr/bin/env bash
# The GPU check in one call (README "GPU check"). On the lent GPU machine's image (Python 3.12,
# torch 2.11 with CUDA 13, no diffusers, no network) it installs sencache and the wheels carried in
# .whl/ (benchmarks/gpu_wheels.sh) with --no-deps into a folder of its own, so the image's torch
# and other packages stay as they are, then runs, each bounded by `timeout` and none stopping the
# next: `sencache doctor`, `sencache gpu-acceptance`, `pytest -m gpu`, and the cached loop on
# tiny-wan with the PyTorch CUDA backend (torch bundle, brief calibration, `generate --device cuda`
# with SenCache and with `--cache none`, compared), the real-size run (Wan 2.1 1.3B's shapes with
# dummy weights drawn on the machine, nothing large carried: a torch bf16 bundle at 33x480x832
# timed on the GPU by benchmarks/gpu_real_size.py; without a GPU, the CPU rehearsal runs the same
# steps at 9x64x64 with one block and labels its figures so), and, where nvidia-smi lists 2 GPUs or more, the
# engine over 2 ranks on NCCL (torchrun; sp=2, then cfg=2, on the loop's bundle: decisions equal to
# one rank's, the decision all-reduce timed; benchmarks/parallel_check.py). On one GPU that step is
# recorded as skipped, and says so. A summary ends the run.
#
# Run from anywhere; it works in the checkout that holds it. Environment (paths may be relative):
#   OUT                 where results go (default: runs/gpu-check in the checkout). It receives eight
#                       files, the most the device tool brings back: summary.txt,
#                       gpu_check.log (every step's output), gpu.json, loop.json, real_size.json,
#                       stats_sencache.json, stats_none.json, parallel_nccl.json
#   PYTHON              the interpreter that holds torch (default: python3)
#   GPU_CHECK_BUDGET_S  the whole run, in seconds (default 480); each step is also capped
#   GPU_CHECK_WORK      scratch space, emptied first if this script made it (default: /tmp/sencache-gpu-check)
# Exit status 0 when no step failed, else 1. Where nvidia-smi lists no GPU (the CPU rehearsal,
# .ci/gpu_rehearsal), a GPU step passes as "skip" only when it ends with its one clear line
# (`sencache <command>: error: ... CUDA/GPU ...`, exit status 2) or, for pytest, skips every test.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${OUT:-$ROOT/runs/gpu-check}")
WORK=$(realpath -m "${GPU_CHECK_WORK:-/tmp/sencache-gpu-check}")
PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
cd "$ROOT" || exit 1
SITE=$WORK/site
DEADLINE=$((SECONDS + BUDGET))
# WORK is emptied only if this script made it (its marker is inside) or it is empty: never a user's folder.
if [ -n "$(ls -A "$WORK" 2>/dev/null)" ] && [ ! -f "$WORK/.sencache-gpu-check-work" ]; then
    echo "gpu_check: $WORK holds files this script did not make; set GPU_CHECK_WORK to a new or empty folder" >&2
    exit 2
fi
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK" && touch "$WORK/.sencache-gpu-check-work" || exit 1
# No figure of an earlier run may pass for this one's.
rm -f "$OUT"/{summary.txt,gpu_check.log,gpu.json,loop.json,real_size.json,stats_sencache.json,stats_none.json,parallel_nccl.json}
LOG=$OUT/gpu_check.log
SUMMARY=$WORK/summary.rows
: >"$LOG"
: >"$SUMMARY"

# The machine reaches no network: fail at once rather than wait on one.
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH

GPUS=$( (command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null) | grep -c '^GPU ')
HAVE_GPU=$((GPUS > 0 ? 1 : 0))

# step NAME KIND CAP_S COMMAND...: run COMMAND for at most CAP_S seconds (less when the budget is
# nearly spent), output to the log, and record a verdict. KIND "host" steps must succeed anywhere;
# "gpu" and "pytest" steps must succeed on a GPU and, without one, skip with their clear line.
step() {
    local name=$1 kind=$2 cap=$3
    shift 3
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 15 ]; then
        printf '%s\tNOT RUN\t-\t0\tno time left of the %s s budget\n' "$name" "$BUDGET" >>"$SUMMARY"
        echo "== $name: NOT RUN (budget spent)"
        return
    fi
    local limit=$((cap < left ? cap : left)) start=$SECONDS
    printf '\n===== %s (at most %s s): %s\n' "$name" "$limit" "$*" >>"$LOG"
    timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$WORK/$name.out" >>"$LOG"
    local rc=${PIPESTATUS[0]} took=$((SECONDS - start))
    local last
    last=$(grep -v '^[[:space:]]*$' "$WORK/$name.out" | tail -n 1 | cut -c1-220)
    local verdict=FAIL
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        verdict=TIMEOUT
    elif grep -q '^Traceback (most recent call last)' "$WORK/$name.out"; then
        verdict=FAIL
    elif [ "$kind" = pytest ] && [ "$rc" -eq 0 ]; then
        if grep -q ' passed' <<<"$last"; then verdict=ok; elif [ "$HAVE_GPU" = 0 ]; then verdict=skip; fi
    elif [ "$rc" -eq 0 ]; then
        verdict=ok
    elif [ "$kind" = gpu ] && [ "$HAVE_GPU" = 0 ] && [ "$rc" -eq 2 ] &&
        grep -Eq '^sencache [a-z-]+: error: .*(CUDA|GPU)' <<<"$last"; then
        verdict=skip
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$verdict" "$rc" "$took" "$last" >>"$SUMMARY"
    printf '%s: %s (exit %s, %s s)\n' "$name" "$verdict" "$rc" "$took" >>"$LOG"
    echo "== $name: $verdict (exit $rc, $took s): $last"
}

install_project() {
    # Built from a copy in WORK: setuptools writes build/ beside its source, and the checkout's
    # build/ may be someone else's (a CMake tree); a stale one would also be reused.
    "$PYTHON" -c 'import shutil, sys; shutil.copytree(".", sys.argv[1], ignore=shutil.ignore_patterns(
        ".git", ".whl", ".cache", "runs", "build", "bundles", "__pycache__", "*.egg-info"))' "$WORK/src" || return
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
        --target "$SITE" .whl/*.whl "$WORK/src" || return
    "$PYTHON" -P - "$SITE" <<'EOF'
import sys
from importlib.metadata import version
from pathlib import Path

import diffusers, sencache, torch  # noqa: E401

site = Path(sys.argv[1]).resolve()
assert Path(sencache.__file__).resolve().is_relative_to(site), f"sencache imported from {sencache.__file__}"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"diffusers {diffusers.__version__}, blake3 {version('blake3')}, sencache from {site}")
EOF
}

loop_run() {  # loop_run CACHE: one generate of the loop's four prompts on the GPU
    sencache generate --engine "$WORK/tiny-wan-torch" --device cuda --cache "$1" --steps 30 \
        --prompt "one large white circle static on black" --seed 1 \
        --prompt "two small red squares moving left fast on texture" --seed 2 \
        --prompt "three small green circles moving up slow on gradient" --seed 3 \
        --prompt "one large blue square moving right fast on black" --seed 4 \
        --out "$WORK/run-$1" && cp "$WORK/run-$1/stats.json" "$OUT/stats_$1.json"
}

parallel_run() {  # the engine over 2 ranks on NCCL, sp=2 then cfg=2, each against one rank
    local parallel status=0
    for parallel in sp=2 cfg=2; do
        # PYTHONSAFEPATH: the ranks torchrun starts import sencache from SITE, never the checkout's folder.
        PYTHONSAFEPATH=1 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 \
            -m sencache.benchmarks.parallel_check --engine "$WORK/tiny-wan-torch" --parallel "$parallel" \
            --device cuda --out "$OUT/parallel_nccl.json" || status=1
    done
    return $status
}

export -f install_project loop_run parallel_run  # run by `timeout bash -c` like any command
export OUT PYTHON WORK SITE
echo "GPU check: $(date -u +%FT%TZ), budget $BUDGET s, GPU listed by nvidia-smi: $([ $HAVE_GPU = 1 ] && echo yes || echo no)," \
    "results in $OUT" | tee -a "$LOG"
step install host 90 install_project
step doctor host 60 sencache doctor
step gpu-acceptance gpu 240 sencache gpu-acceptance --out "$OUT/gpu.json"
# The real-size run. Its Python starts no part past its own budget and writes each part as it is
# measured, so a cut run keeps its figures; the rehearsal's run is labelled one in its JSON.
if [ "$HAVE_GPU" = 1 ]; then
    real_size=(--frames 33 --height 480 --width 832)
    real_run=(--device cuda --budget-s 170)
else
    real_size=(--frames 9 --height 64 --width 64 --layers 1)
    real_run=(--device cpu --rehearsal --steps 4 --passes 1 --budget-s 170)
fi
step real-build host 120 sencache build --model wan2.1-t2v-1.3b --load-format dummy --backend torch \
    --precision bf16 --max-batch 4 "${real_size[@]}" --out "$WORK/wan-1.3b-torch"
step real-size host 190 "$PYTHON" -P -m sencache.benchmarks.gpu_real_size --engine "$WORK/wan-1.3b-torch" \
    "${real_run[@]}" --out "$OUT/real_size.json"
step pytest-gpu pytest 150 "$PYTHON" -P -m pytest -m gpu -q -ra -p no:cacheprovider tests
step loop-build host 90 sencache build --model tiny-wan --backend torch --max-batch 4 --out "$WORK/tiny-wan-torch"
step loop-calibrate host 240 sencache calibrate --engine "$WORK/tiny-wan-torch" --samples 2 --steps 6
step loop-sencache gpu 60 loop_run sencache
step loop-none gpu 60 loop_run none
if [ -f "$OUT/stats_sencache.json" ] && [ -f "$OUT/stats_none.json" ]; then
    step loop-compare host 30 "$PYTHON" -P -m sencache.benchmarks.gpu_check_report loop \
        "$WORK/run-sencache" "$WORK/run-none" --out "$OUT/loop.json"
fi
if [ "$GPUS" -ge 2 ]; then
    step parallel-nccl gpu 180 parallel_run
else
    line="skipped: the 2-rank NCCL run needs 2 GPUs; nvidia-smi lists $GPUS"
    printf 'parallel-nccl\tskip\t-\t0\t%s\n' "$line" >>"$SUMMARY"
    echo "== parallel-nccl: $line" | tee -a "$LOG"
fi

{
    echo
    echo "GPU check summary ($(date -u +%FT%TZ), $SECONDS s in all)"
    printf '%-15s %-8s %4s %5s  %s\n' step verdict exit s "last line"
    while IFS=$'\t' read -r name verdict rc took last; do
        printf '%-15s %-8s %4s %5s  %s\n' "$name" "$verdict" "$rc" "$took" "$last"
    done <"$SUMMARY"
    if [ -f "$OUT/gpu.json" ]; then
        "$PYTHON" -P -m sencache.benchmarks.gpu_check_report figures "$OUT/gpu.json"
    fi
    if [ -f "$OUT/real_size.json" ]; then
        "$PYTHON" -P -m sencache.benchmarks.gpu_check_report real-size "$OUT/real_size.json"
    fi
    if [ -f "$OUT/loop.json" ]; then
        cat "$WORK/loop-compare.out"
    fi
    if [ -f "$OUT/parallel_nccl.json" ]; then
        grep '^parallel ' "$WORK/parallel-nccl.out"
    fi
} | tee "$OUT/summary.txt" | tee -a "$LOG"

! cut -f2 "$SUMMARY" | grep -qvE '^(ok|skip)$'
