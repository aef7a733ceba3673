#!/usr/bin/env bash
# The project's two entry points on a fresh machine (Python 3.11, PyPI reachable, no GPU needed):
#   ./run.sh demo   generate the synthetic defect dataset and run phases 0 → 1 → 2 → 3 on it
#   ./run.sh test   lint and run the test suite
# Both create .venv and install the requirements at the versions of requirements-lock.txt on first use (again
# whenever a requirements file changes).
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$(cat requirements.txt requirements-dev.txt requirements-lock.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing the requirements into .venv (once; torch is a large download, expect a few minutes)" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check \
      -r requirements.txt -r requirements-dev.txt -c requirements-lock.txt
  touch "$stamp"
fi

command=${1:-}
shift || true
case "$command" in
  demo)
    # A fresh output folder every time: the demo trains its own base detector, and a folder belongs to one base.
    rm -rf checkpoints/demo
    .venv/bin/python train_progressive.py --config configs/demo.yaml --phase all --output-dir checkpoints/demo "$@"
    # One annotated validation image from the final model, the one docs/demo_prediction.png shows (skipped when the
    # arguments asked for no training, e.g. --help).
    if [ -f checkpoints/demo/phase3_best.pth ]; then
      .venv/bin/python -m multimodal.tools.predict --checkpoint checkpoints/demo/phase3_best.pth \
          --images data/synthetic_defects/images/val/00002.jpg --output checkpoints/demo/prediction --draw-nms 0.5
    fi
    ;;
  test)
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    exec .venv/bin/python -m pytest -q "$@"
    ;;
  *)
    echo "usage: ./run.sh demo | ./run.sh test [pytest arguments]" >&2
    exit 2
    ;;
esac
