"""TRL 1.16 DPOTrainer.evaluate() on the tiny models, the golden for `preftune dpo --eval-only`.
Policy tiny-llama, reference tiny-qwen2 (same tokenizer), one eval batch holding every pair.
Usage: python scripts/golden_dpo_eval.py   (needs torch, transformers, trl==1.16.0)
Writes fixtures/golden/dpo-eval.json."""
import json, os, tempfile
import torch, trl, transformers
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

ROOT = os.path.join(os.path.dirname(__file__), "..")
M = lambda n: os.path.join(ROOT, "fixtures/models", n)
out = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
       "policy": "tiny-llama", "ref_model": "tiny-qwen2", "cases": []}
for data in ["pairs-standard.jsonl", "pairs-chat.jsonl"]:
    cut = 12 if "standard" in data else 40  # truncates some sequences without emptying any
    for loss_type, beta, max_length in [("sigmoid", 0.1, None), ("ipo", 0.5, None), ("sigmoid", 0.1, cut)]:
        ds = load_dataset("json", data_files=os.path.join(ROOT, "fixtures/data", data), split="train")
        tok = AutoTokenizer.from_pretrained(M("tiny-llama"))
        pol = AutoModelForCausalLM.from_pretrained(M("tiny-llama"), dtype=torch.float32, attn_implementation="eager")
        ref = AutoModelForCausalLM.from_pretrained(M("tiny-qwen2"), dtype=torch.float32, attn_implementation="eager")
        cfg = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_eval_batch_size=16, beta=beta, loss_type=[loss_type],
                        max_length=max_length, report_to=[], use_cpu=True, bf16=False, seed=0)
        tr = DPOTrainer(model=pol, ref_model=ref, args=cfg, train_dataset=ds, eval_dataset=ds, processing_class=tok)
        metrics = tr.evaluate()
        out["cases"].append({"data": data, "loss_type": loss_type, "beta": beta, "max_length": max_length,
                             "metrics": {k: v for k, v in metrics.items() if isinstance(v, float)}})
        print(data, loss_type, beta, max_length, metrics["eval_loss"], metrics["eval_rewards/margins"])
json.dump(out, open(os.path.join(ROOT, "fixtures/golden/dpo-eval.json"), "w"), indent=1)
