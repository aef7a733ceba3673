#!/usr/bin/env bash
# The real converged DEIMv2-Atto (COCO; ../shared/real) with real CLIP text: progressive vs joint fine-tuning, their
# controls and WiSE-FT, on the 208 train2017 images of coco-tiny + COCO128, validated on the 80 coco-tiny val2017
# images the base never trained on. Every run has the same budget (12 epochs of 26 steps at batch 8; the progressive
# run 5 + 4 + 3) and seed list.
#
#   experiments/real_atto.sh 0 1 2      # the seeds; runs under runs/real_atto/<run>_s<seed>, then the table
#   THREADS=1 experiments/real_atto.sh 0 1 2 &  THREADS=1 experiments/real_atto.sh 2 1 0   # two copies, two cores
#
# Run from the repository root. Finished runs are skipped, so an interrupted script can simply be started again; so
# are runs another copy is busy with, and what depends on them: start the script once more at the end to fill in.
set -euo pipefail
python=${PYTHON:-.venv/bin/python}
out=runs/real_atto
export OMP_NUM_THREADS=${THREADS:-2}
data=(--set data.train_images=../shared/datasets --set data.train_annotations=data/coco_train208.json)
seeds=("$@")

# The shared inputs are written once: a second copy of this script must not rewrite them under the first one.
[ -f data/coco_train208.json ] || $python experiments/merge_coco.py --root ../shared/datasets --output data/coco_train208.json \
    coco-tiny/train2017=coco-tiny/annotations/instances_train2017.json \
    coco128/train2017=coco128/annotations/instances_train2017.json
# Random class embeddings (every row is normalised, so of the same norm as CLIP's): the value of the text's meaning.
[ -f data/random_text_80x512.npy ] || $python -c "import numpy as np; np.save('data/random_text_80x512.npy', np.random.default_rng(0).standard_normal((80, 512)).astype('float32'))"

train() {  # train RUN SEED PHASE ARGS...: one phase into runs/real_atto/RUN_sSEED, skipped when done before
  local run=$1 seed=$2 phase=$3
  shift 3
  local dir=$out/${run}_s$seed
  [ -f "$dir/phase$phase.done" ] && return
  if [ "$phase" -gt 1 ] && [ ! -f "$dir/phase$((phase - 1)).done" ]; then
    echo "skipping $dir phase $phase: phase $((phase - 1)) is not finished (another copy of this script runs it)"
    return
  fi
  mkdir -p "$dir"
  if ! mkdir "$dir/phase$phase.lock" 2>/dev/null; then
    echo "skipping $dir phase $phase: another copy of this script runs it (else remove $dir/phase$phase.lock)"
    return
  fi
  trap 'rmdir "$dir/phase$phase.lock"' RETURN
  $python train_progressive.py --config configs/coco_tiny.yaml --phase "$phase" --seed "$seed" --output-dir "$dir" \
      "${data[@]}" --set phase1.warmup_iters=20 --set phase2.warmup_iters=20 --set phase3.warmup_iters=20 "$@" \
      > "$dir/phase$phase.log" 2>&1
  touch "$dir/phase$phase.done"
}

joint=(--set "phase1.trainable=[fusion, encoder, decoder]" --set phase1.epochs=12)
for seed in "${seeds[@]}"; do
  # Progressive with the default phases, 5 + 4 + 3 epochs; and with random text.
  for text in clip random; do
    run=progressive; extra=()
    if [ $text = random ]; then run=progressive_random_text; extra=(--set text_encoder.precomputed=data/random_text_80x512.npy); fi
    train $run "$seed" 1 --set phase1.epochs=5 "${extra[@]}"
    train $run "$seed" 2 --set phase2.epochs=4 "${extra[@]}"
    train $run "$seed" 3 --set phase3.epochs=3 "${extra[@]}"
  done
  train fusion_only "$seed" 1 --set phase1.epochs=12
  train class_heads_only "$seed" 1 --set "phase1.trainable=[class_heads]" --set phase1.lr=5e-5 --set phase1.epochs=12
  train joint_2e-4 "$seed" 1 "${joint[@]}" --set phase1.lr=2e-4
  train joint_2e-5 "$seed" 1 "${joint[@]}" --set phase1.lr=2e-5
  # lr 0: the same batches through a train-mode encoder and decoder, no weight update: BatchNorm drift alone.
  train batchnorm_drift "$seed" 1 "${joint[@]}" --set phase1.lr=0
  # WiSE-FT: the joint 2e-4 end point mixed with the base (once that run is finished).
  if [ ! -f "$out/wise_ft_s$seed/curve.json" ] && [ -f "$out/joint_2e-4_s$seed/phase1.done" ]; then
    $python -m multimodal.tools.interpolate --base ../shared/real/deimv2_atto_coco.pth \
        --finetuned "$out/joint_2e-4_s$seed/phase1_last.pth" --weights 0 0.2 0.4 0.6 0.8 1 --output "$out/wise_ft_s$seed"
  fi
  train joint_backbone_2e-5 "$seed" 1 --set "phase1.trainable=[fusion, backbone, encoder, decoder]" \
      --set phase1.epochs=12 --set phase1.lr=2e-5 --set allow_backbone_training=true
done

$python experiments/compare_runs.py --plot docs/real_atto_runs.png --json docs/real_atto_runs.json \
    $(for run in progressive fusion_only class_heads_only joint_2e-4 joint_2e-5 joint_backbone_2e-5 \
        progressive_random_text batchnorm_drift; do
        printf -- "--run %s=%s " $run "$(ls -d $out/${run}_s* | paste -sd, -)"; done) \
    --wise-ft "$(ls -d $out/wise_ft_s* | paste -sd, -)" | tee $out/summary.md
