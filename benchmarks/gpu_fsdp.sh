#!/usr/bin/env bash
# FSDP2 check of the reward recipes on 2+ GPUs (NCCL, bf16 mixed precision), next to the CPU tests
# (tests/test_fsdp_multiprocess.py, gloo, float32). Runs the tiny GDSO teacher and the tiny RISD
# student under configs/accelerate/fsdp.yaml and under ddp.yaml on the same data and prints both runs'
# losses and the largest difference of their trained adapters: FSDP must take the DDP steps (up to
# bf16 rounding). A few minutes. Usage: bash benchmarks/gpu_fsdp.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_fsdp}
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 2 ]; then
  echo "gpu_fsdp.sh needs 2 or more GPUs (FSDP over one rank is not sharding); found $GPUS" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
python -m zr_diffusion.cli make-tiny "$OUT/teacher" --family qwen3_5 --seed 1
python -m zr_diffusion.cli make-tiny "$OUT/student" --family qwen3_5 --seed 0
python -m zr_diffusion.reward.tiny_data "$OUT/data"

COMMON=(run.device=cuda run.mixed_precision=bf16 dtype=bfloat16 run.tensorboard=false run.progress=false)
for launch in fsdp ddp; do
  accelerate launch --config_file "configs/accelerate/$launch.yaml" --num_processes 2 \
    -m zr_diffusion.cli train-reward --config configs/reward/gdso_tiny.yaml "${COMMON[@]}" \
    model="$OUT/teacher" data.train="$OUT/data/train.jsonl" data.eval="$OUT/data/eval.jsonl" \
    run.output_dir="$OUT/gdso-$launch"
  accelerate launch --config_file "configs/accelerate/$launch.yaml" --num_processes 2 \
    -m zr_diffusion.cli train-reward --config configs/reward/risd_tiny.yaml "${COMMON[@]}" \
    model="$OUT/student" distill.teacher="$OUT/gdso-fsdp/model" distill.cache_dir="$OUT/cache" \
    data.train="$OUT/data/train.jsonl" data.eval="$OUT/data/eval.jsonl" run.output_dir="$OUT/risd-$launch"
done

python - "$OUT" <<'PY'
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

out = Path(sys.argv[1])
for recipe in ("gdso", "risd"):
    runs = {k: out / f"{recipe}-{k}" for k in ("fsdp", "ddp")}
    metrics = {k: json.loads((r / "metrics.json").read_text()) for k, r in runs.items()}
    assert metrics["fsdp"]["fsdp"] and not metrics["ddp"]["fsdp"], "the fsdp run was not sharded"
    a, b = (load_file(str(r / "model/adapter/adapter_model.safetensors")) for r in runs.values())
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    for k, m in metrics.items():
        print(f"{recipe} {k}: losses {[round(r['loss'], 5) for r in m['train']]}")
    print(f"{recipe}: max |adapter fsdp - ddp| = {diff:.2e}")
PY
