"""Reference timing: TRL RewardTrainer on CPU, the workload of scripts/bench_rm.sh.
Usage: MODEL DATA STEPS BATCH MAXLEN. The model is the causal LM folder, loaded as
AutoModelForSequenceClassification with one label (a fresh score head), as TRL does.
Prints median seconds per optimizer step and peak RSS as JSON."""
import json, resource, statistics, sys, tempfile, time
import torch
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl import RewardConfig, RewardTrainer

model_dir, data, steps, bs, maxlen = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
if model.config.pad_token_id is None:
    model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
ds = load_dataset("json", data_files=data, split="train")
times = []


class T(TrainerCallback):
    def on_step_begin(self, a, s, c, **k):
        self.t = time.perf_counter()

    def on_step_end(self, a, s, c, **k):
        times.append(time.perf_counter() - self.t)


cfg = RewardConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=bs, max_steps=steps, max_length=maxlen,
                   learning_rate=1e-5, logging_steps=1, save_strategy="no", report_to=[], bf16=False,
                   gradient_checkpointing=False, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
tr = RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[T()])
t0 = time.perf_counter()
tr.train()
wall = time.perf_counter() - t0
timed = times[2:] if len(times) > 3 else times
print(json.dumps({"workload": "rm", "impl": "trl", "trl_version": __import__("trl").__version__,
                  "threads": torch.get_num_threads(), "steps": len(times), "batch": bs, "max_length": maxlen,
                  "median_step_s": statistics.median(timed), "wall_s": wall,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
