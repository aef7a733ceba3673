#!/usr/bin/env bash
# The device check of the speed work, in one run on one GPU (about 7 minutes on an H100): the table for
# variants s and m (bs 16, 640 px, bf16), the step breakdown and sync counts of the s phase-1 step, and the s phases
# and evaluation with the frozen backbone and encoder compiled.
# Needs only torch, torchvision, scipy and PyYAML. Writes its records under ${OUT:-benchmarks/results}.
set -euo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for variant in s m; do
  python benchmarks/throughput.py --variant $variant --batch-size 16 --image-size 640 --device cuda \
      --steps 20 --warmup 5 --json "$out/throughput_cuda_${variant}_16_640.json"
done
python benchmarks/throughput.py --variant s --batch-size 16 --image-size 640 --device cuda --steps 10 --warmup 3 \
    --cases phase1 --breakdown phase1 --profile --ema --json "$out/throughput_cuda_s_16_640_profile.json"
python benchmarks/throughput.py --variant s --batch-size 16 --image-size 640 --device cuda --steps 20 --warmup 5 \
    --cases phase1 phase2 phase3 eval --breakdown none --compile --json "$out/throughput_cuda_s_16_640_compile.json"
