#!/usr/bin/env bash
# One-command GPU check of reward-gradient steps at real scale (issue 11), under 8 minutes on one GPU:
#   1. SD 1.5 at 512 px (T=20, 2B-size student): every option on and off, K=1 and full backprop; torch.compile;
#   2. SDXL at 1024 px (T=10, 2B-size student): the options on and off, K=1;
#   3. Flux.1 at 1024 px (T=10, 2B-size student) if it fits;
#   4. the verdict: each shipped configs/t2i/*_zreward.yaml at micro-batches 1 and 2 with the 9B-size student,
#      default settings (call) and every memory option (lean), extrapolated to the config's micro-batch.
# Random weights of the real architectures (configs/arch/*.json); nothing is downloaded.
#
#   bash benchmarks/gpu.sh                   # results in runs/bench-gpu/ (OUT_DIR=... to change)
#   ZR_GPU_SH_TINY=1 bash benchmarks/gpu.sh  # the same steps at --size tiny on CPU (tests/test_gpu_script.py)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-runs/bench-gpu}
mkdir -p "$OUT"
JSON="$OUT/results.jsonl"
rm -f "$JSON"
TINY=${ZR_GPU_SH_TINY:-0}
PY=${PYTHON:-python}

# bench SECONDS LABEL ARGS...: one reward_step.py run; a failure (out of memory, time limit) is reported, not fatal.
bench() {
    local limit=$1 label=$2
    shift 2
    if [ "$TINY" = 1 ]; then
        # tiny mode keeps the settings / batch / full-backprop choices and drops the real-scale sizes
        local keep=() skip=0
        for a in "$@"; do
            if [ $skip = 1 ]; then skip=0; continue; fi
            case "$a" in
                --size|--device|--reward|--pixels|--steps|--dtype|--reward-pixels) skip=1 ;;
                --compile) ;;
                *) keep+=("$a") ;;
            esac
        done
        set -- --size tiny --device cpu --repeats 1 --reward-pixels 784 "${keep[@]}"
        limit=300
    fi
    echo "== $label: reward_step.py $*"
    timeout "$limit" "$PY" benchmarks/reward_step.py --label "$label" --json "$JSON" "$@" \
        || echo "== $label: did not finish (exit $?: out of memory or over its ${limit}s limit)"
}

START=$(date +%s)
bench 90 sd15-512 --size sd15 --device cuda --reward qwen2_vl_2b --reward-pixels 200704 --repeats 1 \
    --settings plain call blocks none img-dec vlm-ckpt budget ch-last fast bf16-pre lean --full-settings call blocks
bench 70 sd15-512-compile --size sd15 --device cuda --reward qwen2_vl_2b --repeats 1 --compile \
    --settings plain call compile --full-settings
if [ "$TINY" != 1 ]; then  # tiny mode: stage 1 stands for stages 2 and 3 (same tiny models)
    bench 80 sdxl-1024 --size sdxl --device cuda --reward qwen2_vl_2b --reward-pixels 200704 --repeats 1 \
        --settings call blocks none img-dec vlm-ckpt budget fast bf16-pre lean --full-settings
    bench 50 flux-1024 --size flux --device cuda --reward qwen2_vl_2b --repeats 1 \
        --settings call blocks lean --full-settings
fi
for config in sd15 sdxl flux zimage; do
    [ "$TINY" = 1 ] && [ "$config" != sd15 ] && continue  # tiny mode: one run stands for all configs
    label="fit:${config}_zreward"
    [ "$TINY" = 1 ] && label="fit:tiny"
    bench 45 "$label" --size "$config" --device cuda --reward qwen3_5_9b --steps 2 --batch 1 2 \
        --settings call lean --repeats 1 --full-settings
done
echo "== verdict (configs/t2i/*_zreward.yaml, 9B-size student, K=1)"
if [ "$TINY" = 1 ]; then "$PY" benchmarks/gpu_verdict.py "$JSON" --tiny; else "$PY" benchmarks/gpu_verdict.py "$JSON"; fi
echo "== total $(( $(date +%s) - START )) s; results in $JSON"
