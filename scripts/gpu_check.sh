#!/usr/bin/env bash
# The GPU check, under 5 minutes on one GPU, from the repository root:
#
#     python scripts/make_gpu_carry.py      # here, with network: wheels + a prepared corpus in .gpu_carry/
#     bash scripts/gpu_check.sh             # there, on the GPU machine, with .gpu_carry/ copied along
#
# Steps, each under its own time limit and all within GPU_CHECK_BUDGET seconds:
#   install  the carried wheels (Hydra) into a target folder, offline
#   device   torch sees a CUDA device (else every GPU test would skip, and pass for it)
#   smoke    `python -m lingmao.run hardware=auto model=tiny data=prepared tracking.enabled=false`,
#            which must not import mlflow, datasets or opencc
#   pytest   `pytest -m gpu tests/test_gpu.py`: bf16, fp16 + GradScaler, compile on/off, resume after
#            SIGKILL, DDP on one GPU, peak memory against the plan, MFU
#   bench    the bare training loop of medium at context 768, bf16, compiled
# Each step's output goes to $OUT/check.log as it runs, each result to $OUT/results.jsonl as it is known,
# the runs' own outputs to $OUT/runs.tar.gz after each step; the end prints one table ($OUT/table.txt)
# and exits 1 if any check failed.
#
# GPU_CHECK_REHEARSAL=1 runs the same steps on a machine without a GPU (tests/test_gpu_check.py does, in
# CI): the device is the CPU, fp16 is CPU autocast with a GradScaler, DDP is gloo, the sizes are small,
# and every Python process imports only what the GPU machine has (scripts/gpu_machine/) and the carried
# wheels from where they were installed, so a renamed module, a renamed metric or a missing wheel fails
# the rehearsal, not the GPU window.
#
# Settings (environment): OUT (default ./gpu_check_out), PYTHON (python3), GPU_CHECK_CARRY (.gpu_carry),
# GPU_CHECK_PARTS (install,smoke,pytest,bench), GPU_CHECK_BUDGET (300 s), GPU_CHECK_REHEARSAL (unset).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
CARRY=${GPU_CHECK_CARRY:-.gpu_carry}
[[ $CARRY == /* ]] || CARRY=$PWD/$CARRY
OUTDIR=${OUT:-$PWD/gpu_check_out}
PARTS=,${GPU_CHECK_PARTS:-install,smoke,pytest,bench},
BUDGET=${GPU_CHECK_BUDGET:-300}
REHEARSAL=${GPU_CHECK_REHEARSAL:-}
WORK=$(mktemp -d /tmp/lingmao-gpu-check.XXXXXX)
export GPU_CHECK_SITE=${GPU_CHECK_SITE:-$WORK/site}
mkdir -p "$OUTDIR"
RESULTS=$OUTDIR/results.jsonl LOG=$OUTDIR/check.log
: >"$RESULTS"
: >"$LOG"
GUARD=
[[ -n $REHEARSAL ]] && GUARD=$PWD/scripts/gpu_machine  # sitecustomize: the GPU machine's packages only
export PYTHONUNBUFFERED=1 PYTHONPATH="$GPU_CHECK_SITE:$PWD${GUARD:+:$GUARD}${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_RESULTS=$RESULTS GPU_CHECK_CORPUS=$CARRY/corpus GPU_CHECK_REHEARSAL=$REHEARSAL
export TOKENIZERS_PARALLELISM=false

# step NAME LIMIT COMMAND...: run COMMAND under `timeout` (LIMIT, or what is left of the budget), its
# output to the terminal and $LOG, its exit code and seconds as a row of the table; then the runs'
# outputs so far into $OUT, so a step stopped at its limit still leaves what it measured.
step() {
    local name=$1 limit=$2 left rc start
    shift 2
    left=$((BUDGET - SECONDS))
    if ((left < 15)); then
        echo "{\"check\": \"step $name\", \"result\": \"skipped: the ${BUDGET} s budget is spent\", \"numbers\": {}}" >>"$RESULTS"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most ${limit} s)" | tee -a "$LOG"
    start=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local result=passed
    ((rc == 124 || rc == 137)) && result="FAILED: over its ${limit} s"
    ((rc != 0 && rc != 124 && rc != 137)) && result="FAILED: exit $rc"
    echo "{\"check\": \"step $name\", \"result\": \"$result\", \"numbers\": {\"seconds\": $((SECONDS - start)), \"limit\": $limit}}" >>"$RESULTS"
    tar -czf "$OUTDIR/runs.tar.gz" -C "$WORK" --exclude=site --exclude='*.pt' --exclude='*.bin' . 2>/dev/null
    return 0
}

if [[ -n $REHEARSAL ]]; then
    DEVICE_CHECK="import torch; print('rehearsal on the CPU: torch', torch.__version__, 'CUDA', torch.cuda.is_available())"
    BENCH=(model=tiny model.context_length=128 hardware.precision=bf16 hardware.compile=false)
else
    DEVICE_CHECK="import torch; assert torch.cuda.is_available(), 'torch ' + torch.__version__ + ' sees no CUDA device'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
    BENCH=(model=medium model.context_length=768 hardware.precision=bf16 hardware.compile=true)
fi
if [[ $PARTS == *,install,* ]]; then
    step install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$GPU_CHECK_SITE" "$CARRY"/wheels/*.whl
fi
if [[ $PARTS == *,pytest,* || $PARTS == *,bench,* ]]; then
    step device 60 "$PY" -c "$DEVICE_CHECK"
fi
if [[ $PARTS == *,smoke,* ]]; then
    step smoke 120 "$PY" scripts/gpu_check.py smoke "$RESULTS" -- hardware=auto model=tiny data=prepared \
        "data.prepared_dir=$CARRY/corpus" tracking.enabled=false trainer.max_steps=3 trainer.eval_every=3 \
        trainer.eval_batches=1 trainer.sample_tokens=8 trainer.progress=false "hydra.run.dir=$WORK/smoke"
fi
if [[ $PARTS == *,pytest,* ]]; then
    step pytest 200 env PYTHONPATH="$PWD/scripts:$PYTHONPATH" "$PY" -m pytest -m gpu tests/test_gpu.py -q \
        -p no:cacheprovider -p gpu_pytest_plugin --basetemp="$WORK/pytest"
fi
if [[ $PARTS == *,bench,* ]]; then
    step bench 90 "$PY" scripts/gpu_check.py bench "$RESULTS" -- hardware=auto "${BENCH[@]}" data=prepared \
        "data.prepared_dir=$CARRY/corpus" tracking.enabled=false
fi

echo
echo "== lingmao GPU check${REHEARSAL:+ (rehearsal)}: $(uname -n), $( (nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo no GPU) 2>/dev/null | head -1), ${SECONDS} s" | tee -a "$LOG"
"$PY" scripts/gpu_check.py table "$RESULTS" | tee "$OUTDIR/table.txt"
exit "${PIPESTATUS[0]}"
