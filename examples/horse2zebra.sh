#!/usr/bin/env bash
# Train (or continue), evaluate and picture a horse → zebra capacitor on CycleGAN's horse2zebra folders.
#
#   examples/horse2zebra.sh DATA RUN [MINUTES]
#
# DATA holds trainA/ trainB/ testA/ testB/. The first call starts RUN with efm train's defaults; later calls resume
# it, so a long training is a series of calls. Each call trains for at most MINUTES (default 60), then writes
# RUN/testA-grid.jpg (the first 12 testA photos beside their translations) and RUN/eval.json, and prints the table
# of efm eval (all of testA against testB). The capacitor is RUN/model, ready for `efm translate --model`,
# `efm push` or examples/embed.py.
# Settings of a new run, from the environment: SIZE (64), STEPS (6000; also extends a resumed run), BATCH (points per
# step, 16), CHARGES (per plate; efm train's default), NETWORK (small), DEVICE (auto), LATENT (an autoencoder for a
# latent capacitor, e.g. an `efm autoencoder` run; SIZE must then be a multiple of 8 × its downsampling).
set -euo pipefail
usage="usage: examples/horse2zebra.sh DATA RUN [MINUTES]"
data=${1:?$usage}
run=${2:?$usage}
minutes=${3:-60}
device=${DEVICE:-auto}
for split in trainA trainB testA testB; do
    if [ ! -d "$data/$split" ]; then
        echo "error: $data/$split is not a folder — DATA must hold trainA/, trainB/, testA/ and testB/" >&2
        exit 2
    fi
done

if [ -f "$run/config.json" ]; then
    efm train --resume "$run" --max-minutes "$minutes" --device "$device" ${STEPS:+--steps "$STEPS"}
else
    efm train --source "$data/trainA" --target "$data/trainB" --source-name horse --target-name zebra \
        --size "${SIZE:-64}" --steps "${STEPS:-6000}" --batch-size "${BATCH:-16}" --warmup 200 \
        --network "${NETWORK:-small}" ${CHARGES:+--charges "$CHARGES"} ${LATENT:+--latent "$LATENT"} \
        --device "$device" --out "$run" --max-minutes "$minutes"
fi

picked=$(mktemp -d)
trap 'rm -rf "$picked"' EXIT
mkdir "$picked/horses"
find "$data/testA" -maxdepth 1 -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) | sort | head -n 12 |
    while read -r photo; do cp "$photo" "$picked/horses/"; done
efm translate "$picked/horses" --model "$run/model" --out "$picked/zebras" --device "$device" \
    --grid "$run/testA-grid.jpg" --quiet
efm eval --model "$run/model" --source "$data/testA" --target "$data/testB" \
    --train-source "$data/trainA" --train-target "$data/trainB" --device "$device" --report "$run/eval.json"
