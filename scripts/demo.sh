#!/usr/bin/env bash
# The README's demo: the shipped default model on bundled clips, then extract -> train -> predict on them.
set -euo pipefail
out=${1:-demo-out}
cd "$(dirname "$0")/.."
bin=.venv/bin
mkdir -p "$out"
# the shipped default model, no training: one bundled video with sound, one audio-only clip
$bin/avemo-predict examples/cremad/1001_DFA_HAP_XX.flv --explain "$out/default-explain.png"
$bin/avemo-predict examples/cremad/1002_DFA_HAP_XX.mp3 --json
# a cache left by an earlier avemo whose shipped `default` face encoder has since been replaced would go
# on with that encoder, which today's default model does not read: the demo begins it again
if [ -f "$out/cache/settings.json" ] && ! $bin/python -c 'import json, sys
from avemo.encoders import WEIGHTS_DIR, file_sha256
sys.exit(json.load(open(sys.argv[1]))["settings"].get("encoder_sha256") != file_sha256(WEIGHTS_DIR / "default.pt"))' \
        "$out/cache/settings.json"; then
    echo "demo: $out/cache was made with an earlier default face encoder; extracting it again"
    rm -rf "$out/cache" "$out/run" "$out/eval-default"
fi
# stage one: the 12 bundled clips -> $out/cache (features/*.npz + manifest.csv); resumes if re-run
$bin/avemo-extract examples/cremad --out "$out/cache" --label-from cremad
# the shipped default model scored on those labelled clips (it heard these two actors: the warning says so)
$bin/avemo-evaluate "$out/cache" --out "$out/eval-default"
# stage two: fit the fused model on all 12 clips (--no-split: six clips per actor measure nothing,
# so the report it writes is training-set figures, not an accuracy); --resume makes a re-run a no-op
$bin/avemo-train "$out/cache" --out "$out/run" --no-split --epochs 4 --batch-size 4 \
    --video-hidden 32 --fbp-o 64 --resume --quiet
# stage three: ask the trained model about one bundled clip, with the explanation picture
$bin/avemo-predict examples/cremad/1001_DFA_HAP_XX.flv --model "$out/run/best.pt" --explain "$out/explain.png"
$bin/avemo-predict examples/cremad/1002_DFA_ANG_XX.mp3 --model "$out/run/best.pt" --json
echo "demo: done. Default model's explanation in $out/default-explain.png, its scores in $out/eval-default; cache in $out/cache, model in $out/run, explanation in $out/explain.png"
