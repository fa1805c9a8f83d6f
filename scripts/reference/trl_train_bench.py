"""TRL's trainer on one benchmark workload of scripts/bench_train.sh, with the options preftune
runs with on the other side.

Usage: trl_train_bench.py TRAINER MODEL_DIR DATA BATCH MAX_LENGTH STEPS OPTIONS
TRAINER: sft | dpo | rm. OPTIONS: f32 (bf16=False, no gradient checkpointing, DPO's reference
model run each step), best (bf16=True, gradient_checkpointing=True, DPO's
precompute_ref_log_probs=True) or bf16 (best without gradient checkpointing). Attention: ATTN
(default sdpa, transformers' default and its faster option on CPU; ATTN=eager for the older
tables). One process, no data-loader workers. Prints one JSON line: the median seconds per optimiser step
(the first excluded) and the step count; whole-process wall time and peak RSS are measured
outside, by /usr/bin/time."""
import json, os, statistics, sys, tempfile, time

import torch
from datasets import load_dataset
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          TrainerCallback)

trainer, model_dir, data = sys.argv[1], sys.argv[2], sys.argv[3]
batch, max_len, steps, opts = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
assert trainer in ("sft", "dpo", "rm") and opts in ("f32", "best", "bf16"), sys.argv
bf16, ckpt = opts != "f32", opts == "best"
attn = os.environ.get("ATTN", "sdpa")
times = []


class Timer(TrainerCallback):
    def on_step_begin(self, a, s, c, **k):
        self.t = time.perf_counter()

    def on_step_end(self, a, s, c, **k):
        times.append(time.perf_counter() - self.t)


torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(model_dir)
ds = load_dataset("json", data_files=data, split="train")
common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps,
              max_length=max_len, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
              bf16=bf16, gradient_checkpointing=ckpt, dataloader_num_workers=0, disable_tqdm=True, seed=42)
if trainer == "rm":
    from trl import RewardConfig as Config, RewardTrainer as Trainer
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32,
                                                               attn_implementation=attn)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    cfg = Config(learning_rate=1e-5, **common)
else:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    if trainer == "sft":
        from trl import SFTConfig as Config, SFTTrainer as Trainer
        cfg = Config(learning_rate=2e-5, packing=False, **common)
    else:
        from trl import DPOConfig as Config, DPOTrainer as Trainer
        cfg = Config(learning_rate=1e-6, beta=0.1, precompute_ref_log_probs=bf16, **common)
tr = Trainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
tr.train()
print(json.dumps({"trainer": trainer, "impl": "trl", "options": opts, "attn": attn, "trl": __import__("trl").__version__,
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": batch,
                  "max_length": max_len, "steps": len(times), "median_step_s": statistics.median(times[1:])}))
