#!/usr/bin/env bash
# The README's demo: runs every stage that exists on the bundled clips.
set -euo pipefail
out=${1:-demo-out}
cd "$(dirname "$0")/.."
bin=.venv/bin
mkdir -p "$out"
# stage one: the 12 bundled clips -> $out/cache (features/*.npz + manifest.csv); resumes if re-run
$bin/avemo-extract examples/cremad --out "$out/cache" --label-from cremad
