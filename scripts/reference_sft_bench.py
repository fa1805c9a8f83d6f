"""TRL's SFTTrainer on the SFT benchmark workload (the same as `scripts/bench_sft.sh` runs for
preftune): prompt-completion data, completion-only loss, f32 on CPU, no gradient checkpointing,
no packing. Usage: python scripts/reference_sft_bench.py MODEL_DIR DATA_JSONL BATCH MAX_LEN STEPS
Prints one JSON line: median seconds per optimiser step (first step excluded), tokens/s, peak RSS."""
import json, resource, statistics, sys, tempfile, time

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

model_dir, data, batch, max_len, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])


class Timer(TrainerCallback):
    def __init__(self):
        self.t, self.times = None, []

    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t)


ds = load_dataset("json", data_files=data, split="train")
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
cfg = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_length=max_len, max_steps=steps,
                learning_rate=2e-5, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                gradient_checkpointing=False, packing=False, dataloader_num_workers=0, seed=42)
timer = Timer()
trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
trainer.train()
s = statistics.median(timer.times[1:])

print(json.dumps({"workload": "sft", "impl": "trl", "batch": batch, "max_length": max_len, "threads": torch.get_num_threads(),
                  "seconds_per_step": s, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "losses": [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]}))
