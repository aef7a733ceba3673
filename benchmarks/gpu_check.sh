#!/usr/bin/env bash
# The prepared GPU check, for the day a GPU is lent: benchmarks/gpu_check.py says what it runs (in an 8-minute budget
# on one GPU); its summary table and records go to $OUT.
#
#   bash benchmarks/gpu_check.sh --prepare [SHARED]      here, where PyPI answers: .gpu_check/wheels (the packages a
#                                                        bare GPU machine lacks, built for its CPython 3.12) and
#                                                        .gpu_check/shared (the files of SHARED, default ../shared, that
#                                                        the check reads: ../shared does not travel)
#   bash benchmarks/gpu_check.sh                         on the GPU machine (the device tool's run, carry [".gpu_check"])
#   bash benchmarks/gpu_check.sh --dry-run --device cpu  every step on the CPU with tiny counts (tests/test_gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
stage=.gpu_check
python=${PYTHON:-python3}

if [ "${1:-}" = "--prepare" ]; then
  shared=${2:-../shared}
  rm -rf "$stage"
  mkdir -p "$stage/wheels" "$stage/shared/real" "$stage/shared/clip" "$stage/shared/datasets"
  # The versions of requirements-lock.txt; --no-deps: the image has their other requirements (numpy, timm, torch, …).
  packages=$(grep -E '^(open_clip_torch|pycocotools|faster-coco-eval|ftfy|wcwidth)==' requirements-lock.txt)
  # shellcheck disable=SC2086  # one argument per package
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --dest "$stage/wheels" $packages
  cp "$shared/real/deimv2_atto_coco.pth" "$stage/shared/real/"
  cp "$shared/clip/coco_clip_a+cname.npy" "$stage/shared/clip/"
  cp -r "$shared/datasets/coco-tiny" "$stage/shared/datasets/"
  ls "$stage/wheels"
  du -sh "$stage"
  exit 0
fi

# Where the packages are missing (a bare GPU machine), the carried wheels go to a folder of their own on PYTHONPATH:
# the image's environment stays as it is.
if ! "$python" -c "import open_clip, faster_coco_eval, pycocotools, ftfy" 2>/dev/null; then
  site=$(mktemp -d)
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$stage"/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
exec "$python" benchmarks/gpu_check.py "$@"
