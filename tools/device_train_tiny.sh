#!/usr/bin/env bash
# Train the tiny text-to-image model from scratch on a lent GPU machine (see tools/device_pack.py), for
# $1 of wall time (Lightning max_time, default 00:00:07:00), then bring back the EMA weights as float16
# CompVis shards under 16 MiB each, the metrics and the log:
#   python tools/device_pack.py .devpack \
#       --config sdkit/configs/recipes/tiny-t2i/stage1.yaml sdkit/configs/recipes/tiny-t2i/gpu.yaml
#   (device) bash tools/device_train_tiny.sh 00:00:07:00
# Rejoin here: python tools/device_train_tiny_join.py <files_at> data/tiny.safetensors
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash .devpack/unpack.sh
source /tmp/devenv.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
R=sdkit/configs/recipes/tiny-t2i
python3 -m sdkit.cli train -b $R/stage1.yaml $R/gpu.yaml \
    --name tiny-t2i-gpu model.training.first_stage_ckpt=data/tiny-autoencoder.safetensors \
    "lightning.trainer.max_time=\"${1:-00:00:07:00}\"" "${@:2}" 2>&1 | tee "$OUT/train.log" | grep -v "it/s\]$" || true
run=$(ls -d logs/*tiny-t2i-gpu | tail -1)
python3 -m sdkit.cli convert "$run/checkpoints/last.ckpt" /tmp/tiny-gpu.safetensors --config tiny --to compvis --half
python3 - "$OUT" <<'PY'
import sys
from safetensors.torch import load_file, save_file
state = load_file("/tmp/tiny-gpu.safetensors")
shards, size = [{}], 0
for k, v in state.items():          # shards under 16 MiB: what the device tool brings back per file
    n = v.numel() * v.element_size()
    if size + n > 15 * 2**20:
        shards.append({}); size = 0
    shards[-1][k] = v; size += n
for i, s in enumerate(shards):
    save_file(s, f"{sys.argv[1]}/tiny-gpu-{i}.safetensors")
print(f"{len(state)} tensors in {len(shards)} shards")
PY
cp "$run"/configs/*-project.yaml "$OUT"/ 2>/dev/null || true
find "$run" -name metrics.csv -exec cp {} "$OUT/metrics.csv" \;
ls -la "$OUT"
