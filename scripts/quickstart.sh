#!/usr/bin/env bash
# Installs the requirements, trains SSCD on the built-in synthetic ACDC-layout data (every stage,
# a few minutes on a CPU) and evaluates the final model on the synthetic test volumes.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt
python3 code/train_ACDC_SSCD.py --config configs/quickstart.yaml --overwrite "$@"
python3 code/test_ACDC.py --checkpoint model/quickstart_SSCD/best.pth --split test --workers 0
