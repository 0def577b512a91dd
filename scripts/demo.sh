#!/usr/bin/env bash
# The README's demo: runs every stage that exists on the bundled clips.
set -euo pipefail
out=${1:-demo-out}
cd "$(dirname "$0")/.."
bin=.venv/bin
mkdir -p "$out"
# stage one: the 12 bundled clips -> $out/cache (features/*.npz + manifest.csv); resumes if re-run
$bin/avemo-extract examples/cremad --out "$out/cache" --label-from cremad
# stage two: fit the fused model on all 12 clips (--no-split: six clips per actor measure nothing,
# so the report it writes is training-set figures, not an accuracy); --resume makes a re-run a no-op
$bin/avemo-train "$out/cache" --out "$out/run" --no-split --epochs 4 --batch-size 4 --audio-channels 8,16,32 \
    --video-hidden 32 --fbp-o 64 --resume --quiet
