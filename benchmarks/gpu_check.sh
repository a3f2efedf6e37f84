#!/usr/bin/env bash
# Where a CUDA GPU exists: a short real pretraining on it with 1 Ray Train worker (bf16,
# torch.compile, fused AdamW, NCCL process group), then the step benchmark for ViT-B and ViT-L.
#
#   bash benchmarks/gpu_check.sh            # after `make install`; ~5 minutes on one H100
#
# Exits non-zero if the run fails or its loss does not go down.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUNS=$(mktemp -d)
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name())"

"$PY" pipelines/pretrain.py --config configs/demo.yaml \
    scaling.accelerator=cuda scaling.num_workers=1 scaling.cpus_per_worker=1 \
    train.precision=bf16 train.compile=true train.epochs=6 optim.warmup_epochs=1 \
    run.storage_path="$RUNS" run.name=gpu_check

"$PY" - "$RUNS/gpu_check/metrics.jsonl" <<'PYEOF'
import json, sys
m = [json.loads(line) for line in open(sys.argv[1])]
print("epochs:", [round(x["train_loss"], 4) for x in m])
assert len(m) == 6 and m[-1]["train_loss"] < m[0]["train_loss"], "loss did not go down on the GPU"
PYEOF

"$PY" benchmarks/train_step.py --model mae_vit_base_patch16 --device cuda --batch 128
"$PY" benchmarks/train_step.py --model mae_vit_large_patch16 --device cuda --batch 64
