# Shared by scripts/gpu/timing.sh and scripts/gpu/table22.sh (sourced): preftune's timed runs and
# the GPU memory reading around every row, ours and the reference's alike.
# Needs BIN, PY, WORK and `model` (the model folder); DEVICE (default cuda; cpu rehearses), BATCH,
# MAXLEN, STEPS, KERNELS, GRAPHS and TABLE (a name every line then carries) are read when a row runs.
DEVICE=${DEVICE:-cuda}
# The reference on the same device (reference_steps.py reads DEV).
export DEV=$DEVICE
data="$WORK/timing.jsonl"
[ -f "$data" ] || $PY scripts/gpu/make_timing_data.py "$data" 64

# Runs a command while sampling the GPU's used memory; prints the command's last JSON line with
# `gpu_mem_peak_mib` (peak minus the idle reading before it; null without nvidia-smi), `model`
# ($label) and `table` ($TABLE, when set) added.
with_mem() {
    local base="" poll="" peak=null
    if command -v nvidia-smi > /dev/null; then
        base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$WORK/mem.txt" &
        poll=$!
    fi
    "$@" > "$WORK/run.out" 2> "$WORK/run.err"
    local rc=$?
    if [ -n "$poll" ]; then
        kill $poll; wait $poll 2>/dev/null
        peak=$(( $(sort -n "$WORK/mem.txt" | tail -1) - base ))
    fi
    [ $rc -eq 0 ] || { tail -n 5 "$WORK/run.err" >&2; return $rc; }
    grep '^{' "$WORK/run.out" | tail -1 | $PY -c "
import json, sys
d = json.load(sys.stdin)
d['gpu_mem_peak_mib'] = json.loads(sys.argv[1])
d['model'] = sys.argv[2]
if sys.argv[3]:
    d['table'] = sys.argv[3]
print(json.dumps(d))" "$peak" "$label" "${TABLE:-}"
}

# preftune's step time: the median difference of elapsed time between logged steps (the first
# logged step, with its warm-up, left out). The line names the batch, max_length, bf16 and
# gradient checkpointing of the run.
ours() {
    local algo=$1; shift
    rm -rf "$WORK/t-out"
    PREFTUNE_CUDA_KERNELS=${KERNELS:-0} "$BIN" --device "$DEVICE" "$algo" --set model_name_or_path="$model" \
        --set train_file="$data" --set output_dir="$WORK/t-out" --set per_device_train_batch_size=$BATCH \
        --set max_length=$MAXLEN --set max_steps=$((STEPS + 2)) --set logging_steps=1 --set save_steps=100000 \
        --set learning_rate=1e-6 --set max_grad_norm=1.0 "$@" > /dev/null || return 1
    rm -rf "$WORK/t-out/model.safetensors" "$WORK/t-out/optimizer.safetensors"
    $PY - "$WORK/t-out/metrics.jsonl" "$algo" "$*${KERNELS:+ PREFTUNE_CUDA_KERNELS=$KERNELS}" "$BATCH" "$MAXLEN" <<'PY'
import json, statistics, sys
m = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
el = [r["num_tokens"] / r["train_tokens_per_second"] for r in m]
steps = [b - a for a, b in zip(el, el[1:])][1:]
s = statistics.median(steps)
opts = sys.argv[3]
print(json.dumps({"impl": "preftune", "workload": sys.argv[2], "options": opts,
                  "bf16": "bf16=true" in opts, "gradient_checkpointing": "gradient_checkpointing=true" in opts,
                  "batch": int(sys.argv[4]), "max_length": int(sys.argv[5]), "steps": len(steps),
                  "median_step_s": s, "tokens_per_s": (m[-1]["num_tokens"] - m[-2]["num_tokens"]) / s}))
PY
}

# A GRPO iteration (issue 22's shape): 8 prompts x 8 samples up to 256 new tokens, digits as the
# reward, beta 0, then the update; the median of the steps after the first.
ours_grpo() {
    rm -rf "$WORK/g-out"
    PREFTUNE_CUDA_KERNELS=${KERNELS:-0} PREFTUNE_CUDA_GRAPHS=${GRAPHS:-0} "$BIN" --device "$DEVICE" grpo \
        --set model_name_or_path="$model" --set train_file=bench/prompts.jsonl --set output_dir="$WORK/g-out" \
        --set per_device_train_batch_size=8 --set num_generations=8 --set max_completion_length=${NEW:-256} \
        --set temperature=1.0 --set beta=0.0 --set max_steps=$((${GRPO_STEPS:-3} + 1)) --set logging_steps=1 \
        --set save_steps=100000 --set learning_rate=1e-6 --set max_grad_norm=1.0 \
        --set "reward=\"command:python3 examples/rewards/count_digits.py\"" "$@" > /dev/null || return 1
    rm -rf "$WORK/g-out/model.safetensors" "$WORK/g-out/optimizer.safetensors"
    $PY - "$WORK/g-out/metrics.jsonl" "$*${KERNELS:+ PREFTUNE_CUDA_KERNELS=$KERNELS}${GRAPHS:+ PREFTUNE_CUDA_GRAPHS=$GRAPHS}" "${NEW:-256}" <<'PY'
import json, statistics, sys
m = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
el = [r["num_tokens"] / r["train_tokens_per_second"] for r in m]
steps = [b - a for a, b in zip(el, el[1:])]
print(json.dumps({"impl": "preftune", "workload": "grpo", "options": sys.argv[2], "bf16": "bf16=true" in sys.argv[2],
                  "prompts": 8, "num_generations": 8, "max_completion_length": int(sys.argv[3]),
                  "steps": len(steps), "median_step_s": statistics.median(steps)}))
PY
}
