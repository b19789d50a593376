#!/usr/bin/env bash
# The GPU check in one command (bench/README.md, "Device check"): installs the required modules that do
# not import here from the wheels carried in .whl/ (no registry is needed; optional ones too where .whl/
# holds them), then runs bench/device_check.py: the CUDA test suite, the benchmark at 256^2 / batch 24 and
# a short real SSCD and labeled-only training, within 9 minutes. Its JSON is rewritten after every phase
# and the logs are kept beside it, so a failing or killed phase still leaves its results.
#
#   bash bench/device_check.sh --out "$OUT/device_check.json"    # CUDA machine
#   bash bench/device_check.sh --dry_run --out /tmp/dry.json      # CPU dry run, under a minute
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
required=$("$PY" bench/device_check.py --missing)
optional=$("$PY" bench/device_check.py --missing_optional)
wheels=()
for name in $required; do
  found=$(ls .whl/"$name"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$found" ]; then
    echo "device_check: $name does not import and .whl/ holds no $name wheel (see bench/README.md)" >&2
    exit 2
  fi
  wheels+=("$found")
done
for name in $optional; do
  found=$(ls .whl/"$name"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$found" ]; then
    wheels+=("$found")
  else
    echo "device_check: optional $name is not installed (bench/README.md says what it adds)"
  fi
done
if [ ${#wheels[@]} -gt 0 ]; then
  site=${SSCD_SITE:-/tmp/sscd_site}
  echo "device_check: installing ${wheels[*]} into $site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" bench/device_check.py "$@"
