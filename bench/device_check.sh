#!/usr/bin/env bash
# The GPU check in one command (bench/README.md, "Device check"): installs the requirements that do
# not import here from the wheels carried in .whl/ (no registry is needed), then runs
# bench/device_check.py: the benchmark at 256^2 / batch 24 and a short real SSCD and labeled-only
# training, all within 9 minutes, written to one JSON file.
#
#   bash bench/device_check.sh --out "$OUT/device_check.json"    # CUDA machine
#   bash bench/device_check.sh --dry_run --out /tmp/dry.json      # CPU dry run, seconds
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
missing=$("$PY" bench/device_check.py --missing)
if [ -n "$missing" ]; then
  wheels=()
  for name in $missing; do
    found=$(ls .whl/"$name"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$found" ]; then
      echo "device_check: $name does not import and .whl/ holds no $name wheel (see bench/README.md)" >&2
      exit 2
    fi
    wheels+=("$found")
  done
  site=${SSCD_SITE:-/tmp/sscd_site}
  echo "device_check: installing ${wheels[*]} into $site" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" bench/device_check.py "$@"
