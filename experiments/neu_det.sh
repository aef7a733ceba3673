#!/usr/bin/env bash
# NEU-DET: base detector, then progressive (phases 1 → 2 → 3) vs joint fine-tuning at two learning rates, from two
# bases: after 16 epochs (still improving) and after 12 more (flattening). Every fine-tuning run starts from its base
# checkpoint and trains the same fusion module for 5 epochs. Run from the repository root; outputs go to runs/neu_det/.
set -euo pipefail
python=${PYTHON:-.venv/bin/python}
config=configs/neu_det.yaml
out=runs/neu_det

# 1. VOC → COCO with a seeded, class-stratified 80/20 split (the recipe, not the data, lives in the repo).
$python -m multimodal.data.voc2coco --images ../shared/datasets/neu-det/images \
    --annotations ../shared/datasets/neu-det/annotations --output data/neu_det.json --val-fraction 0.2 --seed 0

# 2. Base detectors: atto from scratch (no pretrained backbone offline), then 12 more epochs at half the LR.
$python train_progressive.py --config $config --phase 0 --output-dir $out/base
$python train_progressive.py --config $config --phase 0 --init $out/base/phase0_best.pth --output-dir $out/base_long \
    --set phase0.epochs=12 --set phase0.lr=0.001 --set phase0.warmup_iters=20

for round in "base " "base_long long_"; do
  read -r base prefix <<< "$round"
  # 3. Progressive: fusion (2 epochs, 2e-4) → + class heads (2, 5e-5) → + decoder (1, 2e-5).
  $python train_progressive.py --config $config --phase 1 --init $out/$base/phase0_best.pth \
      --output-dir $out/${prefix}progressive
  $python train_progressive.py --config $config --phase 2 --output-dir $out/${prefix}progressive
  $python train_progressive.py --config $config --phase 3 --output-dir $out/${prefix}progressive
  # 4. Joint controls: fusion + encoder + decoder (everything but the backbone) from the first step, 5 epochs.
  for lr in 2e-5 2e-4; do
    $python train_progressive.py --config $config --phase 1 --init $out/$base/phase0_best.pth \
        --output-dir $out/${prefix}joint_$lr \
        --set "phase1.trainable=[fusion, encoder, decoder]" --set phase1.lr=$lr --set phase1.epochs=5
  done
  # 5. Tables and the AP-per-epoch figure.
  $python experiments/compare_runs.py --run progressive=$out/${prefix}progressive \
      --run joint_2e-5=$out/${prefix}joint_2e-5 --run joint_2e-4=$out/${prefix}joint_2e-4 \
      --plot docs/neu_det_${prefix}runs.png | tee $out/${prefix}summary.md
done
