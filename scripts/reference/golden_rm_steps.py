"""Golden for reward-model training against TRL: `fixtures/golden/rm-steps-tiny-llama.json`.

TRL's RewardTrainer on the CPU in f32 (`bf16=False`: TRL 1.x defaults to bf16 autocast, on the
CPU too) on the tiny Llama fixture, with a score head drawn by transformers (torch seed 0,
N(0, initializer_range)), the 8 pairs of examples/data/pairs-tiny.jsonl as one batch per step (so
the data order cannot matter), 6 steps at learning rate 1e-3 and TRL's defaults otherwise (linear
decay, AdamW, max_grad_norm 1). Records the head it started from, the rewards before training,
and each step's loss and gradient norm.

Usage (the reference venv of scripts/requirements-reference.txt), from the repository root:
  python scripts/reference/golden_rm_steps.py fixtures/golden/rm-steps-tiny-llama.json
"""
import json, sys, tempfile
import torch
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

MODEL, DATA, STEPS, LR = "fixtures/models/tiny-llama", "examples/data/pairs-tiny.jsonl", 6, 1e-3
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(MODEL)
model = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=1, dtype=torch.float32)
head = model.score.weight.detach().clone()
ds = load_dataset("json", data_files={"train": DATA})["train"]
cfg = RewardConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, max_steps=STEPS,
                   learning_rate=LR, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                   disable_tqdm=True, seed=0, bf16=False)
tr = RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
# The rewards before training, in the dataset's order (no shuffling in the eval loader).
batch = next(iter(tr.get_eval_dataloader(tr.train_dataset)))
with torch.no_grad():
    r = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
n = len(ds)
tr.train()
steps = [dict(loss=h["loss"], grad_norm=h["grad_norm"], learning_rate=h["learning_rate"])
         for h in tr.state.log_history if "loss" in h]
open(sys.argv[1], "w").write(json.dumps(dict(
    source="trl/trainer/reward_trainer.py RewardTrainer, trl 1.16.0, transformers 5.23.0, torch 2.15.0, f32 CPU",
    model=MODEL, data=DATA, learning_rate=LR, per_device_train_batch_size=8, max_steps=STEPS,
    score_head=head.squeeze(0).tolist(), initializer_range=model.config.initializer_range,
    rewards_chosen=r[:n].tolist(), rewards_rejected=r[n:].tolist(), steps=steps), indent=1) + "\n")
