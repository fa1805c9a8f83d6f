# Copied unchanged from the team reference workloads (shared/bench/trl_dpo_bench.py) so a fresh clone has it.
"""Reference timing: TRL DPOTrainer on CPU. Prints seconds per optimizer step
(median over the timed steps) and peak RSS. Usage: MODEL DATA STEPS BATCH MAXLEN"""
import sys, time, json, resource, statistics, os
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer
model_dir, data, steps, bs, maxlen = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
ds = load_dataset('json', data_files=data, split='train')
times = []
class T(TrainerCallback):
    def on_step_begin(self, a, s, c, **k): self.t = time.perf_counter()
    def on_step_end(self, a, s, c, **k): times.append(time.perf_counter() - self.t)
cfg = DPOConfig(output_dir=__import__('tempfile').mkdtemp(), per_device_train_batch_size=bs, max_steps=steps, max_length=maxlen,
                learning_rate=1e-6, beta=0.1, logging_steps=1, save_strategy='no', report_to=[], bf16=False,
                gradient_checkpointing=False, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
tr = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[T()])
t0 = time.perf_counter(); tr.train(); wall = time.perf_counter() - t0
timed = times[2:] if len(times) > 3 else times
print(json.dumps({'impl': 'trl', 'trl_version': __import__('trl').__version__, 'torch': torch.__version__,
                  'threads': torch.get_num_threads(), 'steps': len(times), 'batch': bs, 'max_length': maxlen,
                  'median_step_s': statistics.median(timed), 'wall_s': wall,
                  'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
