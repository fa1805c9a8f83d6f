"""Reference timing: TRL GRPOTrainer on CPU, the workload of scripts/bench_grpo.sh.
Usage: MODEL PROMPTS STEPS PROMPTS_PER_STEP NUM_GENERATIONS MAX_COMPLETION_LENGTH
Reward: digits in the completion (examples/rewards/count_digits.py on the preftune side).
Prints median seconds per optimizer step (each step: sample, score, one update) and peak RSS."""
import json, resource, statistics, sys, tempfile, time
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

model_dir, data = sys.argv[1], sys.argv[2]
steps, prompts_per_step, gens, max_len = map(int, sys.argv[3:7])
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
ds = load_dataset("json", data_files=data, split="train")


def digits(completions, **kw):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


times = []


class T(TrainerCallback):
    def on_step_begin(self, a, s, c, **k):
        self.t = time.perf_counter()

    def on_step_end(self, a, s, c, **k):
        times.append(time.perf_counter() - self.t)


cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=prompts_per_step * gens,
                 num_generations=gens, max_completion_length=max_len, max_steps=steps, learning_rate=1e-6,
                 temperature=1.0, beta=0.0, logging_steps=1, save_strategy="no", report_to=[], bf16=False,
                 gradient_checkpointing=False, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
tr = GRPOTrainer(model=model, reward_funcs=digits, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[T()])
t0 = time.perf_counter()
tr.train()
wall = time.perf_counter() - t0
timed = times[1:] if len(times) > 1 else times
print(json.dumps({"workload": "grpo", "impl": "trl", "trl_version": __import__("trl").__version__,
                  "threads": torch.get_num_threads(), "steps": len(times), "prompts_per_step": prompts_per_step,
                  "num_generations": gens, "max_completion_length": max_len,
                  "median_step_s": statistics.median(timed), "wall_s": wall,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
