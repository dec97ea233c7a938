#!/usr/bin/env bash
# The GPU check, benchmarks/device_check.py, with the wheels it needs beyond the GPU image (7 MB: diffusers and
# ftfy are pure Python, wcwidth an abi3 x86-64 wheel).
#
#   bash benchmarks/device_check.sh fetch     here, with a network: download WHEELS into .whl/ (ignored by git)
#   bash benchmarks/device_check.sh [ARGS]    on the GPU machine: install .whl/ into /tmp/site, run the check
#
# With the device tool: run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=560).
# The table and the log are written to $OUT (device_check.txt, device_check.log) when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.9.4"

if [ "${1:-}" = fetch ]; then
    # shellcheck disable=SC2086  # one word per wheel
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 -d .whl $WHEELS
fi

if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "device_check.sh: no wheels in .whl/; run 'bash benchmarks/device_check.sh fetch' first and carry .whl" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
python3 benchmarks/device_check.py --out "$out/device_check.txt" "$@" 2>&1 | tee "$out/device_check.log"
