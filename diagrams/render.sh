#!/usr/bin/env bash
# Renders every diagrams/*.dot to SVG (Debian: apt-get install graphviz) and stamps the SVG with
# the source's SHA-256, which tests/test_diagrams.py checks so the two never drift apart.
set -euo pipefail
cd "$(dirname "$0")"
for src in *.dot; do
  svg="${src%.dot}.svg"
  sum=$(sha256sum "$src" | cut -d' ' -f1)
  dot -Tsvg "$src" | sed "0,/<svg/s//<!-- source: $src sha256: $sum -->\n<svg/" > "$svg"
  echo "$svg"
done
