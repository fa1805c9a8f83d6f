"""Inputs for a paired reward-model comparison (BENCHMARKS.md, issue 24): for seed S, the training
file in one shuffled order and a SmolLM2 sequence-classification folder whose score head
transformers drew (torch seed 1000 + S). `preftune rm` and TRL's RewardTrainer then both start from
that head and read that order (`train_sampling_strategy = "sequential"` on both sides), so what
differs between them is the implementation alone.

Usage: paired_rm_inputs.py HF_MODEL_DIR TRAIN_JSONL SEED OUT_PREFIX
writes OUT_PREFIX-S.jsonl and the folder OUT_PREFIX-init-S."""
import random, sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model_dir, train, s, prefix = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rows = open(train).read().splitlines()
random.Random(1000 + s).shuffle(rows)
open(f"{prefix}-{s}.jsonl", "w").write("\n".join(rows) + "\n")
torch.manual_seed(1000 + s)
tok = AutoTokenizer.from_pretrained(model_dir)
m = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
m.config.pad_token_id = tok.pad_token_id
m.save_pretrained(f"{prefix}-init-{s}")
tok.save_pretrained(f"{prefix}-init-{s}")
print("score head std", m.score.weight.std().item())
