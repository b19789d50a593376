#!/usr/bin/env bash
# Installs the requirements and runs the test suite. Set SSCD_SHARED_DATA to the folder holding
# ACDC/ and prostate/ to run the real-data tests on real data (synthetic data otherwise); every skip is
# listed with its reason at the end (-rs).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt
python3 -m pytest -q -rs tests "$@"
