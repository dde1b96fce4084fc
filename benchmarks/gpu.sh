#!/usr/bin/env bash
# The prepared GPU run (benchmarks/gpu.py) on a machine with one CUDA GPU, from a checkout that need not be
# installed: it writes results.json, eval.json, testA-grid.jpg, loss.png, log.txt and capacitor/ into OUT and prints
# results.json on stdout. Within 9 minutes.
#
#   benchmarks/gpu.sh [OUT] [gpu.py options]      # OUT defaults to $OUT
#
# The horse2zebra folders come from $DATA, else ../shared/data/horse2zebra beside the checkout, else
# .gpu-data/horse2zebra inside it: a 128×128 copy (about 40 MB, MNIST included) that
# `python benchmarks/gpu.py --pack .gpu-data` makes where the data is, to send along with the checkout.
set -euo pipefail
out=${1:-${OUT:?usage: benchmarks/gpu.sh OUT [gpu.py options], or set OUT}}
shift || true
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
data=${DATA:-}
for candidate in "$root/../shared/data/horse2zebra" "$root/.gpu-data/horse2zebra"; do
    if [ -z "$data" ] && [ -d "$candidate" ]; then
        data=$candidate
    fi
done
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec python3 "$root/benchmarks/gpu.py" --out "$out" ${data:+--data "$data"} "$@"
