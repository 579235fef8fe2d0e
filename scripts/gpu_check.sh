#!/usr/bin/env bash
# The GPU check, under 8 minutes on one GPU, from the repository root:
#
#     python scripts/make_gpu_carry.py      # here, with network: wheels + a prepared corpus in .gpu_carry/
#     bash scripts/gpu_check.sh             # there, on the GPU machine, with .gpu_carry/ copied along
#
# Steps, each under its own time limit and all within GPU_CHECK_BUDGET seconds:
#   install  the carried wheels (Hydra) into a target folder, offline
#   cuda     torch sees a CUDA device (else the GPU tests would all be skipped)
#   smoke    `python -m lingmao.run hardware=auto model=tiny data=prepared tracking.enabled=false`,
#            which must not import mlflow, datasets or opencc
#   pytest   `pytest -m gpu tests/test_gpu.py`: bf16, fp16 + GradScaler, compile on/off, resume after
#            SIGKILL, DDP on one GPU, peak memory against the plan, MFU
#   bench    the bare training loop of medium at context 768, bf16, compiled
# then prints one table (check, result, numbers) and exits 1 if any check failed.
#
# Settings (environment): OUT (where logs and results go; default ./gpu_check_out), PYTHON (python3),
# GPU_CHECK_CARRY (.gpu_carry), GPU_CHECK_PARTS (install,smoke,pytest,bench), GPU_CHECK_BUDGET (460 s).
# Without a GPU, GPU_CHECK_PARTS=install,smoke rehearses the rest (hardware=auto picks the CPU).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
CARRY=${GPU_CHECK_CARRY:-.gpu_carry}
[[ $CARRY == /* ]] || CARRY=$PWD/$CARRY
OUTDIR=${OUT:-$PWD/gpu_check_out}
PARTS=,${GPU_CHECK_PARTS:-install,smoke,pytest,bench},
BUDGET=${GPU_CHECK_BUDGET:-460}
SITE=${GPU_CHECK_SITE:-/tmp/lingmao-gpu-site}
WORK=$(mktemp -d /tmp/lingmao-gpu-check.XXXXXX)
mkdir -p "$OUTDIR"
RESULTS=$OUTDIR/results.jsonl
: >"$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_RESULTS=$RESULTS GPU_CHECK_CORPUS=$CARRY/corpus TOKENIZERS_PARALLELISM=false

# step NAME LIMIT COMMAND...: run COMMAND under `timeout` (LIMIT, or what is left of the budget),
# its output to the terminal and OUTDIR/NAME.log, its exit code and seconds as a row of the table.
step() {
    local name=$1 limit=$2 left rc start
    shift 2
    left=$((BUDGET - SECONDS))
    if ((left < 15)); then
        echo "{\"check\": \"step $name\", \"result\": \"skipped: the ${BUDGET} s budget is spent\", \"numbers\": {}}" >>"$RESULTS"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most ${limit} s)"
    start=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
    rc=${PIPESTATUS[0]}
    local result=passed
    ((rc == 124 || rc == 137)) && result="FAILED: over its ${limit} s"
    ((rc != 0 && rc != 124 && rc != 137)) && result="FAILED: exit $rc"
    echo "{\"check\": \"step $name\", \"result\": \"$result\", \"numbers\": {\"seconds\": $((SECONDS - start)), \"limit\": $limit}}" >>"$RESULTS"
    return 0
}

if [[ $PARTS == *,install,* ]]; then
    step install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$CARRY"/wheels/*.whl
fi
if [[ $PARTS == *,pytest,* || $PARTS == *,bench,* ]]; then  # else every GPU test would skip, and pass for it
    step cuda 60 "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch ' + torch.__version__ + ' sees no CUDA device'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
fi
if [[ $PARTS == *,smoke,* ]]; then
    step smoke 120 "$PY" scripts/gpu_check.py smoke "$RESULTS" -- hardware=auto model=tiny data=prepared \
        "data.prepared_dir=$CARRY/corpus" tracking.enabled=false trainer.max_steps=3 trainer.eval_every=3 \
        trainer.eval_batches=1 trainer.sample_tokens=8 trainer.progress=false "hydra.run.dir=$WORK/smoke"
fi
if [[ $PARTS == *,pytest,* ]]; then
    step pytest 320 env PYTHONPATH="$PWD/scripts:$PYTHONPATH" "$PY" -m pytest -m gpu tests/test_gpu.py -q \
        -p no:cacheprovider -p gpu_pytest_plugin --basetemp="$WORK/pytest"
fi
if [[ $PARTS == *,bench,* ]]; then
    step bench 120 "$PY" scripts/gpu_check.py bench "$RESULTS" -- hardware=auto model=medium \
        model.context_length=768 hardware.precision=bf16 hardware.compile=true data=prepared \
        "data.prepared_dir=$CARRY/corpus" tracking.enabled=false
fi

echo
echo "== lingmao GPU check: $(uname -n), $( (nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo no GPU) 2>/dev/null | head -1), ${SECONDS} s"
"$PY" scripts/gpu_check.py table "$RESULTS" | tee "$OUTDIR/table.txt"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
