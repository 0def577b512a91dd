#!/usr/bin/env bash
# The README's demo: runs every stage that exists on the bundled clips.
set -euo pipefail
out=${1:-demo-out}
cd "$(dirname "$0")/.."
bin=.venv/bin
mkdir -p "$out"
echo "demo: no stage is wired in yet"
