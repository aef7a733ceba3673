#!/usr/bin/env bash
# The real converged DEIMv2-Atto (COCO; ../shared/real) with real CLIP text: progressive vs joint fine-tuning, their
# controls and WiSE-FT, on the 208 train2017 images of coco-tiny + COCO128, validated on the 80 coco-tiny val2017
# images the base never trained on. Every run has the same budget (12 epochs of 26 steps at batch 8; the progressive
# run 5 + 4 + 3) and seed list. The grid, its resume and the report are experiments/evidence.py's.
#
#   experiments/real_atto.sh 0 1 2      # the seeds; runs under runs/real_atto/<run>_s<seed>, then evidence.md
#   THREADS=1 experiments/real_atto.sh 0 1 2 &  THREADS=1 experiments/real_atto.sh 2 1 0   # two copies, two cores
#
# Run from the repository root. Finished phases are reused, so an interrupted script can simply be started again; a
# copy skips the phases another copy is busy with: start the script once more at the end to fill in.
set -euo pipefail
python=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${THREADS:-2}

# The shared input is written once: a second copy of this script must not rewrite it under the first one.
[ -f data/coco_train208.json ] || $python experiments/merge_coco.py --root ../shared/datasets --output data/coco_train208.json \
    coco-tiny/train2017=coco-tiny/annotations/instances_train2017.json \
    coco128/train2017=coco128/annotations/instances_train2017.json

$python experiments/evidence.py --config configs/coco_tiny.yaml --init ../shared/real/deimv2_atto_coco.pth \
    --output runs/real_atto --seeds "$@" --python "$python" \
    --runs progressive progressive_random_text progressive_permuted_text fusion_only class_heads_only \
        joint_2e-4 joint_2e-5 batchnorm_drift wise_ft joint_backbone_2e-5 \
    --set data.train_images=../shared/datasets --set data.train_annotations=data/coco_train208.json \
    --set phase1.epochs=5 --set phase2.epochs=4 --set phase3.epochs=3 \
    --set phase1.warmup_iters=20 --set phase2.warmup_iters=20 --set phase3.warmup_iters=20
