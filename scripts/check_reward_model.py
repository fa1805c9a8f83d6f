"""Checks that transformers loads a reward model saved by `preftune rm` unchanged and scores as we do;
a LoRA reward model (an adapter folder, `use_peft`) loads through peft onto its base.
Usage: python scripts/check_reward_model.py RM_DIR SCORED.jsonl
SCORED.jsonl: output of `preftune score --reward model:RM_DIR` on plain-text rows (prompt, response),
with the model's normalisation at gain 1, bias 0 (the default). Needs scripts/requirements-reference.txt."""
import json, os, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model_dir, scored = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(model_dir)
adapter = os.path.exists(os.path.join(model_dir, "adapter_config.json"))
if adapter:
    from peft import PeftModel
    base = json.load(open(os.path.join(model_dir, "adapter_config.json")))["base_model_name_or_path"]
    m = AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.float32, num_labels=1)
    m = PeftModel.from_pretrained(m, model_dir).eval()
else:
    m = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
assert m.config.num_labels == 1, m.config.num_labels
worst = 0.0
rows = [json.loads(l) for l in open(scored) if l.strip()]
for r in rows:
    text = r["prompt"] + r["response"]
    if not text.endswith(tok.eos_token):
        text += tok.eos_token  # as TRL's RewardTrainer (and preftune) tokenize plain text
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        s = m(**ids).logits[0, 0].item()
    worst = max(worst, abs(s - r["reward"]))
print(json.dumps({"rows": len(rows), "architecture": m.config.architectures[0], "peft": adapter,
                  "max_abs_diff": worst}))
assert worst < 1e-4, worst
