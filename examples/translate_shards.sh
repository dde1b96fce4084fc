#!/usr/bin/env bash
# Translate a folder tree with N parallel efm processes, one shard each; rerun it to finish an interrupted job.
#
#   examples/translate_shards.sh INPUT_DIR OUTPUT_DIR DOMAIN [N]
#
# Every process sees the same sorted file list and takes its own shard (--shard I/N), so together they translate
# each file exactly once. --skip-existing makes a rerun pick up where a killed run stopped; outputs are written
# atomically, so no half-written image is ever kept. Each shard gets an equal share of the CPU threads. The script
# exits with the worst exit code of its shards (3 = some inputs were skipped; see the shard logs).
set -euo pipefail

if [[ $# -lt 3 ]]; then
    echo "usage: $0 INPUT_DIR OUTPUT_DIR DOMAIN [N]" >&2
    exit 2
fi
input=$1
output=$2
domain=$3
shards=${4:-$(nproc)}
threads=$(( $(nproc) / shards ))
(( threads >= 1 )) || threads=1

mkdir -p "$output"
pids=()
for (( i = 1; i <= shards; i++ )); do
    OMP_NUM_THREADS=$threads efm translate "$input" --to "$domain" --out "$output" \
        --shard "$i/$shards" --skip-existing -q --json > "$output/.shard-$i-of-$shards.json" &
    pids+=($!)
done

worst=0
for pid in "${pids[@]}"; do
    code=0
    wait "$pid" || code=$?
    (( code > worst )) && worst=$code
done
echo "translated $input → $output in $shards shards (exit $worst; reports in $output/.shard-*.json)" >&2
exit "$worst"
