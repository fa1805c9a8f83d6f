"""The MoE load-balancing loss as transformers 5.23 computes it (`output_router_logits=True`) and as
TRL 1.16's DPOTrainer adds it to its loss, on the tiny MoE fixtures: the golden for
`crates/model/tests/router_aux.rs` and `crates/train/tests/dpo.rs`.
Usage: python scripts/golden_router_aux.py   (needs torch, transformers, trl==1.16.0)
Writes fixtures/golden/router-aux.json."""
import json, os, tempfile
import torch, trl, transformers
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

ROOT = os.path.join(os.path.dirname(__file__), "..")
M = lambda n: os.path.join(ROOT, "fixtures/models", n)
MODELS = ["tiny-mixtral", "tiny-qwen3moe", "tiny-qwen2moe"]
# Two rows, the second left-padded by 3 (pad id 3, masked).
IDS = [[5, 9, 17, 3, 22, 8, 14, 40, 41], [3, 3, 3, 7, 11, 120, 300, 2, 64]]
MASK = [[1] * 9, [0, 0, 0] + [1] * 6]
out = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
       "input_ids": IDS, "attention_mask": MASK, "models": {}, "dpo_eval": []}
for name in MODELS:
    model = AutoModelForCausalLM.from_pretrained(M(name), dtype=torch.float32, attn_implementation="eager")
    model.train()
    o = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), output_router_logits=True)
    o.aux_loss.backward()
    # The routers' gradients whole; a first-layer projection's (reached through the hidden states
    # the second layer routes) in its first 512 entries.
    short = lambda t, n=None: [float(f"{x:.7g}") for x in t.flatten().tolist()[:n]]
    grads = {n: short(p.grad, None if n.endswith("mlp.gate.weight") else 512) for n, p in model.named_parameters()
             if p.grad is not None and (n.endswith("mlp.gate.weight") or n == "model.layers.0.self_attn.q_proj.weight")}
    out["models"][name] = {"aux_loss": o.aux_loss.item(), "grads": grads}
    print(name, o.aux_loss.item(), sorted(grads))
for name in MODELS:
    for coef in [None, 0.5]:
        ds = load_dataset("json", data_files=os.path.join(ROOT, "fixtures/data/pairs-standard.jsonl"), split="train")
        tok = AutoTokenizer.from_pretrained(M(name))
        pol = AutoModelForCausalLM.from_pretrained(M(name), dtype=torch.float32, attn_implementation="eager")
        ref = AutoModelForCausalLM.from_pretrained(M("tiny-qwen2"), dtype=torch.float32, attn_implementation="eager")
        cfg = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_eval_batch_size=16, beta=0.1,
                        router_aux_loss_coef=coef, report_to=[], use_cpu=True, bf16=False, seed=0)
        tr = DPOTrainer(model=pol, ref_model=ref, args=cfg, train_dataset=ds, eval_dataset=ds, processing_class=tok)
        metrics = tr.evaluate()
        out["dpo_eval"].append({"model": name, "router_aux_loss_coef": coef,
                                "metrics": {k: v for k, v in metrics.items() if isinstance(v, float)}})
        print(name, coef, metrics["eval_loss"], metrics.get("eval_aux_loss"))
json.dump(out, open(os.path.join(ROOT, "fixtures/golden/router-aux.json"), "w"), indent=1)
