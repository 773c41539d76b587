#!/usr/bin/env bash
# Rewrites scripts/constraints-newest.txt with today's newest release on PyPI of every package the pinned set pins
# (torch excepted: it stays the CPU build of the pinned set), so CI's second set is "what a user's pip install gets
# today", yet pinned: a run is repeatable, and a new release shows up as a reviewed diff of this file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=scripts/constraints-newest.txt
{
    echo "# The newest releases on PyPI as of $(date -u +%Y-%m-%d), written by scripts/refresh_newest.sh; do not edit by hand."
    echo "# torch stays the CPU build of the pinned set (an unpinned torch pulls a multi-GB CUDA build)."
    grep -E '^torch==' scripts/constraints-pinned.txt
    # the pinned set's packages, and the libraries under transformers whose releases change its behaviour
    for pkg in $(grep -vE '^(#|torch==|$)' scripts/constraints-pinned.txt | cut -d= -f1) tokenizers huggingface_hub safetensors; do
        newest=$($PY -m pip index versions "$pkg" 2>/dev/null | sed -n "s/^$pkg (\(.*\))$/\1/Ip" | head -1)
        [ -n "$newest" ] || { echo "refresh_newest: PyPI gave no version for $pkg" >&2; exit 1; }
        echo "$pkg==$newest"
    done
} > "$out.tmp"
mv "$out.tmp" "$out"
cat "$out"
