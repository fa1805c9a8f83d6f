#!/usr/bin/env bash
# The GPU checks of docs/gpu.md, in one script for one NVIDIA GPU (under 8 minutes on an H200).
# Needs only the repository, a `--features cuda` binary (scripts/build-cuda.sh) and a python3 with
# torch + transformers + safetensors (the GPU machine's own); no network.
#
#   BIN=path/to/preftune (default target/release/preftune; a .gz beside it is unpacked)
#   OUT=folder for logs and results (default runs/gpu-check)
#   SECTIONS="parity kernels steps generate dpo-run variants commands timing" (default: all)
#
# Prints one JSON line per check and a summary; exits 1 if a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/preftune}
OUT=${OUT:-runs/gpu-check}
SECTIONS=${SECTIONS:-parity kernels steps generate dpo-run variants commands timing}
mkdir -p "$OUT"
if [ ! -x "$BIN" ] && [ -f "$BIN.gz" ]; then gunzip -c "$BIN.gz" > "$BIN" && chmod +x "$BIN"; fi
BIN=$(realpath "$BIN")
PY=${PY:-python3}
# Models and runs on the repository's disk: /tmp can be small (a 1B model's checkpoint is 15 GB).
mkdir -p runs
work=$(mktemp -d "$PWD/runs/gpu-check-work.XXXX")
summary="$OUT/summary.jsonl"
: > "$summary"
: > "$OUT/checks.log"
failed=0
log() { echo "$1" | tee -a "$summary"; }
# A check: NAME COMMAND... Its JSON lines go to the summary, everything it prints to checks.log
# (the device tool returns few files); a non-zero exit is a failure.
check() {
    local name=$1; shift
    local t0=$SECONDS
    "$@" > "$work/out" 2> "$work/err"
    local rc=$?
    { echo "=== $name (rc $rc, $((SECONDS - t0)) s)"; cat "$work/out"; tail -n 40 "$work/err"; } >> "$OUT/checks.log"
    grep '^{' "$work/out" >> "$summary"
    if [ $rc -eq 0 ]; then
        echo "ok   $name ($((SECONDS - t0)) s)"
    else
        failed=$((failed + 1))
        echo "FAIL $name ($((SECONDS - t0)) s): $(grep -m1 -i 'error' "$work/err" | cut -c1-300)"
        log "{\"check\": \"$name\", \"ok\": false}"
    fi
}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }

# The CUDA libraries preftune loads at run time: torch's wheels carry cuBLAS and cuRAND.
site=$($PY -c 'import site; print(site.getsitepackages()[0])')
libdirs=$(find "$site/nvidia" /usr/local/cuda/lib64 -maxdepth 3 \( -name 'libcublas.so*' -o -name 'libcurand.so*' \) \
    -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:-}"
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
log "{\"gpu\": \"$gpu\", \"date\": \"$(date -u +%FT%TZ)\", \"torch\": \"$($PY -c 'import torch; print(torch.__version__)')\", \"transformers\": \"$($PY -c 'import transformers; print(transformers.__version__)')\"}"
check device-opens "$BIN" --device cuda inspect --model fixtures/models/tiny-llama --prompt hi

want parity && check parity $PY scripts/gpu/parity.py "$BIN"
# preftune's own CUDA kernels (crates/kernels-cuda) against the composed ops, forward and
# gradients, in f32, bf16 and f64.
want kernels && check kernels "$BIN" --device cuda check-kernels

# Random models of two real shapes (no real weights on the GPU machine).
models=()
if [ "$SECTIONS" != parity ]; then
    for shape in smollm2-135m llama-3.2-1b; do
        if $PY scripts/gpu/make_random_model.py "$work/$shape" "$shape" 0 > /dev/null 2>> "$OUT/checks.log"; then
            models+=("$shape")
        else
            failed=$((failed + 1))
            log "{\"check\": \"model-$shape\", \"ok\": false}"
        fi
    done
fi

# One step of each trainer on the CPU and on the GPU, from the same weights and data: the first
# update's loss and every gradient (PREFTUNE_DUMP_FIRST_UPDATE, which then stops the run), f32.
step_pair() {
    local t=$1 shape=$2; shift 2
    for dev in cpu cuda; do
        PREFTUNE_CUDA_KERNELS=${KERNELS:-0} PREFTUNE_DUMP_FIRST_UPDATE="$work/$t-$shape-$dev.st" "$BIN" --device $dev $t \
            --config "${CONFIG:-examples/$t-tiny.toml}" --set model_name_or_path="$work/$shape" --set max_steps=1 \
            --set output_dir="$work/run-$t-$shape-$dev" "$@" > /dev/null || return 1
        rm -rf "$work/run-$t-$shape-$dev"
    done
    $PY scripts/gpu/compare_updates.py "$work/$t-$shape-cpu.st" "$work/$t-$shape-cuda.st" "step-$t-$shape"
}
steps_for() {
    local shape=$1 len="reward=command:python3 scripts/gpu/reward_length.py"
    check "step-sft-$shape" step_pair sft "$shape" --set max_length=128
    check "step-dpo-$shape" step_pair dpo "$shape"
    check "step-rm-$shape" step_pair rm "$shape"
    check "step-grpo-$shape" step_pair grpo "$shape" --set "$len"
    check "step-ppo-$shape" step_pair ppo "$shape" --set gradient_accumulation_steps=1
}

# The variants, at the small shape only: LoRA, gradient checkpointing, RLOO, REINFORCE, PPO with
# the value head on the policy.
variants_for() {
    local shape=$1 len="reward=command:python3 scripts/gpu/reward_length.py"
    check "step-dpo-lora-$shape" step_pair dpo "$shape" --set use_peft=true
    check "step-sft-checkpointing-$shape" step_pair sft "$shape" --set max_length=128 \
        --set gradient_checkpointing=true
    check "step-rloo-$shape" step_pair rloo "$shape" --set "$len"
    CONFIG=examples/rloo-tiny.toml check "step-reinforce-$shape" step_pair reinforce "$shape" \
        --set "$len"
    check "step-ppo-shared-head-$shape" step_pair ppo "$shape" --set gradient_accumulation_steps=1 \
        --set shared_value_head=true
}

# Greedy decoding, token for token, 64 tokens.
greedy() {
    local shape=$1
    for dev in cpu cuda; do
        "$BIN" --device $dev generate --model "$work/$shape" --prompt "The movie was good and the actors" \
            --temperature 0 --max-new-tokens 64 --min-new-tokens 64 > "$work/greedy-$shape-$dev.json" || return 1
    done
    $PY - "$work/greedy-$shape-cpu.json" "$work/greedy-$shape-cuda.json" "$shape" <<'PY'
import json, sys
a, b = (json.load(open(p))["ids"] for p in sys.argv[1:3])
a, b = (x[0] if x and isinstance(x[0], list) else x for x in (a, b))
same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
ok = a == b and len(a) >= 64
print(json.dumps({"check": "greedy-64-tokens", "model": sys.argv[3], "ok": ok, "tokens": len(a), "first_difference": same}))
sys.exit(0 if ok else 1)
PY
}
# Sampling at T=0.9 on the GPU, drawing on the device (the default there) and on the host: the
# same logits, so the same 64 tokens unless a draw lands within rounding of a block's edge.
draws() {
    local shape=$1
    for on in host device; do
        "$BIN" --device cuda generate --model "$work/$shape" --prompt "The movie was good and the actors" \
            --temperature 0.9 --seed 3 --max-new-tokens 64 --min-new-tokens 64 --draw-on $on \
            > "$work/draws-$shape-$on.json" || return 1
    done
    $PY - "$work/draws-$shape-host.json" "$work/draws-$shape-device.json" "$shape" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
same = next((i for i, (x, y) in enumerate(zip(a["ids"], b["ids"])) if x != y), None)
lp = max((abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])), default=0.0)
ok = a["ids"] == b["ids"] and len(a["ids"]) >= 64 and lp < 1e-3
print(json.dumps({"check": "draws-device-vs-host", "model": sys.argv[3], "ok": ok,
                  "tokens": len(a["ids"]), "first_difference": same, "max_logprob_diff": lp}))
sys.exit(0 if ok else 1)
PY
}
# A short DPO run on the GPU whose loss falls.
dpo_run() {
    "$BIN" --device cuda dpo --config examples/dpo-tiny.toml --set model_name_or_path="$work/smollm2-135m" \
        --set learning_rate=1e-4 --set max_steps=20 --set logging_steps=5 --set save_steps=1000 \
        --set output_dir="$work/dpo-run" > /dev/null || return 1
    $PY - "$work/dpo-run/metrics.jsonl" <<'PY'
import json, sys
loss = [json.loads(l)["loss"] for l in open(sys.argv[1]) if '"loss"' in l]
ok = len(loss) >= 2 and loss[-1] < loss[0]
print(json.dumps({"check": "dpo-run-loss-falls", "ok": ok, "losses": [round(x, 4) for x in loss]}))
sys.exit(0 if ok else 1)
PY
}
# A reward model trained on the GPU, checkpointed, and resumed on the CPU: its loss after four
# steps against four steps on the GPU alone (AdamW amplifies f32 differences: 1e-3 relative).
# Then `score` with it and `bon` with it on both devices: the same rewards (1e-4) and picks.
rm_and_rewards() {
    local m="$work/$1" rows="$work/rows.jsonl"
    rm_run() {
        "$BIN" --device "$1" rm --config examples/rm-tiny.toml --set model_name_or_path="$m" \
            --set max_steps="$2" --set save_steps=2 --set logging_steps=1 --set output_dir="$3" \
            --set lr_scheduler_type=constant \
            ${4:-} > /dev/null
    }
    rm_run cuda 4 "$work/rm-gpu" && rm_run cuda 2 "$work/rm-mixed" && rm_run cpu 4 "$work/rm-mixed" --resume || return 1
    $PY - "$work" "$rows" <<'PY' || return 1
import json, sys
loss = lambda d: [json.loads(l) for l in open(f"{sys.argv[1]}/{d}/metrics.jsonl") if '"grad_norm"' in l][-1]["loss"]
a, b = loss("rm-gpu"), loss("rm-mixed")
ok = abs(a - b) <= 1e-3 * abs(a)
print(json.dumps({"check": "gpu-checkpoint-resumes-on-cpu", "ok": ok, "loss_gpu": a, "loss_gpu_then_cpu": b}))
with open(sys.argv[2], "w") as f:
    for p, r in [("The movie was", " good and long."), ("I liked", " the music a lot."), ("It was", " bad.")]:
        f.write(json.dumps({"prompt": p, "response": r}) + "\n")
sys.exit(0 if ok else 1)
PY
    for dev in cpu cuda; do
        "$BIN" --device $dev score --reward "model:$work/rm-gpu" --data "$rows" --out "$work/score-$dev.jsonl" > /dev/null \
            && "$BIN" --device $dev bon --model "$m" --reward "model:$work/rm-gpu" --n 4 --data "$rows" \
                --out "$work/bon-$dev.jsonl" --max-new-tokens 16 --seed 3 --keep-all > /dev/null || return 1
    done
    $PY - "$work" <<'PY'
import json, sys
rows = lambda f: [json.loads(l) for l in open(f"{sys.argv[1]}/{f}")]
sc, sg = rows("score-cpu.jsonl"), rows("score-cuda.jsonl")
diff = max(abs(a["reward"] - b["reward"]) for a, b in zip(sc, sg))
bc, bg = rows("bon-cpu.jsonl"), rows("bon-cuda.jsonl")
same = all(a["response"] == b["response"] for a, b in zip(bc, bg))
bdiff = max(abs(x - y) for a, b in zip(bc, bg) for x, y in zip(a["rewards"], b["rewards"]))
ok = diff <= 1e-4 and same and bdiff <= 1e-4
print(json.dumps({"check": "score-and-bon-cpu-vs-gpu", "ok": ok, "score_max_diff": diff,
                  "bon_same_picks": same, "bon_reward_max_diff": bdiff}))
sys.exit(0 if ok else 1)
PY
}

# No silent round trips: a training step's host<->device traffic (logged per step on a GPU) stays
# under 10% of the model's weights. Copying parameters or gradients would be 100% or more.
copies() {
    "$BIN" --device cuda dpo --config examples/dpo-tiny.toml --set model_name_or_path="$work/$1" \
        --set max_steps=4 --set logging_steps=1 --set save_steps=1000 \
        --set output_dir="$work/copies-$1" > /dev/null || return 1
    $PY - "$work/copies-$1/metrics.jsonl" "$(stat -c %s "$work/$1/model.safetensors")" "$1" <<'PY'
import json, sys
m = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l][1:]
weights = int(sys.argv[2])
worst = max((r.get("device/h2d_bytes_per_step", float("inf")) + r.get("device/d2h_bytes_per_step", 0)
             for r in m), default=float("inf"))
ok = worst < 0.1 * weights
print(json.dumps({"check": "host-device-bytes-per-step", "model": sys.argv[3], "ok": ok,
                  "worst_bytes_per_step": worst, "weights_bytes": weights}))
sys.exit(0 if ok else 1)
PY
    local rc=$?
    rm -rf "$work/copies-$1"
    return $rc
}

# First timings against PyTorch + transformers on the same GPU.
timing_for() {
    check "timing-$1" env BIN="$BIN" PY="$PY" WORK="$work" PRECISIONS="$2" \
        bash scripts/gpu/timing.sh "$work/$1" "$1"
}

# Cheapest and most telling first: a run cut short still returns what it finished.
has() { [[ " ${models[*]} " == *" $1 "* ]]; }
if want generate; then
    for shape in "${models[@]}"; do check "greedy-$shape" greedy "$shape"; done
    [ ${#models[@]} -eq 0 ] || check "draws-${models[0]}" draws "${models[0]}"
fi
want steps && has smollm2-135m && steps_for smollm2-135m
# The same first updates with preftune's CUDA kernels on the GPU (KERNELS=1 sets
# PREFTUNE_CUDA_KERNELS=1 for both runs; the CPU ignores it).
if want kernels && has smollm2-135m; then
    KERNELS=1 check step-sft-kernels-smollm2-135m step_pair sft smollm2-135m --set max_length=128
    KERNELS=1 check step-dpo-kernels-smollm2-135m step_pair dpo smollm2-135m
    # LoRA on every linear with dropout: the fused delta and the dropout kernel on the GPU.
    KERNELS=1 check step-dpo-lora-kernels-smollm2-135m step_pair dpo smollm2-135m \
        --set use_peft=true --set 'lora_target_modules=["all-linear"]' --set lora_dropout=0.1
fi
want dpo-run && has smollm2-135m && check dpo-run dpo_run
want steps && has smollm2-135m && check copies-smollm2-135m copies smollm2-135m
want variants && has smollm2-135m && variants_for smollm2-135m
want commands && has smollm2-135m && check rm-and-rewards-smollm2-135m rm_and_rewards smollm2-135m
want steps && has llama-3.2-1b && steps_for llama-3.2-1b
want timing && has smollm2-135m && timing_for smollm2-135m "false true"
want timing && has llama-3.2-1b && timing_for llama-3.2-1b "true"

rm -rf "$work"
echo "summary: $failed failed; $OUT/summary.jsonl"
[ "$failed" -eq 0 ]
