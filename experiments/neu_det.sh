#!/usr/bin/env bash
# NEU-DET steel-surface defects, the user's situation: a converged defect detector, then the evidence that text fusion
# with progressive unfreezing keeps what it knew, and whether the text helps.
#  1. VOC → COCO with a seeded, class-stratified 80/20 split (the recipe, not the data, lives in the repo).
#  2. The base: the real COCO DEIMv2-Atto (../shared/real) fine-tuned on the train split with new class heads
#     (phase 0, configs/neu_det.yaml: 12 epochs at lr 1e-3).
#  3. The evidence grid (experiments/evidence.py) with all-MiniLM-L6-v2 text, at the budget that fits two shared CPU
#     cores: each progressive phase 1 epoch (78 steps at batch 16), every one-phase run 3; seeds from the command line.
#
#   experiments/neu_det.sh 0 1                                   # runs under runs/neu_det/, report in grid/evidence.md
#   THREADS=1 experiments/neu_det.sh 0 1 &  THREADS=1 experiments/neu_det.sh 1 0   # two copies, two cores (after the base)
#
# Run from the repository root. The grid continues where it stopped; a killed base resumes with
# train_progressive.py --resume runs/neu_det/base/phase0_last.pth. On your own machine use CLIP text instead of
# MiniLM: add --set text_encoder.backend=open_clip --set text_encoder.model=ViT-B-32 --set text_encoder.pretrained=openai.
set -euo pipefail
python=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${THREADS:-2}
config=configs/neu_det.yaml
out=runs/neu_det

[ -f data/neu_det_train.json ] || $python -m multimodal.data.voc2coco --images ../shared/datasets/neu-det/images \
    --annotations ../shared/datasets/neu-det/annotations --output data/neu_det.json --val-fraction 0.2 --seed 0

if [ ! -f $out/base.done ]; then
  $python train_progressive.py --config $config --phase 0 --init ../shared/real/deimv2_atto_coco.pth \
      --set model.reinit_class_heads=true --output-dir $out/base
  touch $out/base.done
fi

# The text-reliance repeats are left out to fit the budget (the random-text run and the held-out test ask whether the
# text's content matters); permuted text cannot change AP with the detector's own class rows (evidence.md says why).
$python experiments/evidence.py --config $config --init $out/base/phase0_best.pth --output $out/grid \
    --seeds "$@" --python "$python" --budget 0.34 \
    --runs held_out_classes progressive progressive_random_text joint_2e-4 joint_2e-5 \
    --set monitor.text_reliance=never
