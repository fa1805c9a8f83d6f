"""TRL's RewardTrainer on CPU, f32, for comparing reward models like for like with `preftune rm`.

Usage: trl_rm.py MODEL_DIR TRAIN_JSONL EVAL_JSONL SEED [LR] [BATCH] [MAX_LENGTH] [EPOCHS]
(defaults 1e-4, 8, 64, 1: TRL's learning rate). Prints one JSON line: the initial reward scale
and loss on the first batch, held-out pair accuracy and loss after training, wall time.

f32 without gradient checkpointing, as `preftune rm` runs by default (TRL 1.x turns both bf16 and
checkpointing on unless told otherwise). TRAIN_SAMPLING=sequential keeps the training file's order
(transformers' `train_sampling_strategy`), to replay one order on both sides; MODEL_DIR may then
hold a score head too, so both sides start from the same head.
"""
import json, sys, time, tempfile
import torch
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

model_dir, train, evalf, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lr = float(sys.argv[5]) if len(sys.argv) > 5 else 1e-4
bs = int(sys.argv[6]) if len(sys.argv) > 6 else 8
max_len = int(sys.argv[7]) if len(sys.argv) > 7 else 64
epochs = float(sys.argv[8]) if len(sys.argv) > 8 else 1.0
torch.manual_seed(seed)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
ds = load_dataset("json", data_files={"train": train, "eval": evalf})
cfg = RewardConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=bs, per_device_eval_batch_size=bs,
                   num_train_epochs=epochs, learning_rate=lr, max_length=max_len, seed=seed,
                   logging_steps=10, save_strategy="no", eval_strategy="no", report_to=[], bf16=False,
                   gradient_checkpointing=False,
                   train_sampling_strategy=__import__("os").environ.get("TRAIN_SAMPLING", "random"),
                   use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
tr = RewardTrainer(model=model, args=cfg, train_dataset=ds["train"], eval_dataset=ds["eval"], processing_class=tok)
before = tr.evaluate()
t0 = time.perf_counter()
out = tr.train()
wall = time.perf_counter() - t0
after = tr.evaluate()
first = next(h for h in tr.state.log_history if "loss" in h)
print(json.dumps({"impl": "trl", "trl": __import__("trl").__version__, "seed": seed, "lr": lr,
                  "init_eval_loss": before["eval_loss"], "init_eval_mean_reward": before.get("eval_mean_reward"),
                  "first_logged_train": first, "eval_loss": after["eval_loss"],
                  "eval_accuracy": after.get("eval_accuracy"), "eval_mean_reward": after.get("eval_mean_reward"),
                  "train_loss": out.training_loss, "train_s": wall}))
