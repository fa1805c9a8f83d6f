"""TRL 1.16's KTOTrainer, ORPOTrainer and CPOTrainer (sigmoid, simpo) evaluate() on the tiny models,
the goldens for `preftune kto|orpo|cpo --eval-only`, and their losses' gradients with respect to the
sequence log-probs, for the pure functions in crates/train/src/po.rs.
Policy tiny-llama; KTO's reference tiny-qwen2 (same tokenizer); one eval batch holding every row.
Usage: python scripts/golden_po_eval.py   (needs torch, transformers, trl==1.16.0)
Writes fixtures/golden/po-eval.json."""
import json, os, tempfile, types
import torch, trl, transformers
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import KTOConfig, KTOTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

ROOT = os.path.join(os.path.dirname(__file__), "..")
M = lambda n: os.path.join(ROOT, "fixtures/models", n)
torch.manual_seed(0)
out = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
       "policy": "tiny-llama", "ref_model": "tiny-qwen2", "cases": [], "losses": {}}


def load(n):
    return AutoModelForCausalLM.from_pretrained(M(n), dtype=torch.float32, attn_implementation="eager")


common = dict(per_device_eval_batch_size=16, per_device_train_batch_size=16, report_to=[], use_cpu=True,
              bf16=False, seed=0)
for data in ["pairs-standard.jsonl", "pairs-chat.jsonl", "thumbs-standard.jsonl"]:
    ds = lambda: load_dataset("json", data_files=os.path.join(ROOT, "fixtures/data", data), split="train")
    tok = AutoTokenizer.from_pretrained(M("tiny-llama"))
    runs = [
        ("kto", {"beta": 0.1}, lambda a: KTOTrainer(model=load("tiny-llama"), ref_model=load("tiny-qwen2"),
                                                  args=KTOConfig(output_dir=tempfile.mkdtemp(), **a, **common),
                                                  train_dataset=ds(), eval_dataset=ds(), processing_class=tok)),
        ("kto", {"beta": 0.5, "desirable_weight": 1.5, "undesirable_weight": 0.7},
         lambda a: KTOTrainer(model=load("tiny-llama"), ref_model=load("tiny-qwen2"),
                              args=KTOConfig(output_dir=tempfile.mkdtemp(), **a, **common),
                              train_dataset=ds(), eval_dataset=ds(), processing_class=tok)),
        ("orpo", {"beta": 0.1}, lambda a: ORPOTrainer(model=load("tiny-llama"),
                                                    args=ORPOConfig(output_dir=tempfile.mkdtemp(), **a, **common),
                                                    train_dataset=ds(), eval_dataset=ds(), processing_class=tok)),
        ("cpo", {"beta": 0.1, "loss_type": "sigmoid"},
         lambda a: CPOTrainer(model=load("tiny-llama"), args=CPOConfig(output_dir=tempfile.mkdtemp(), **a, **common),
                              train_dataset=ds(), eval_dataset=ds(), processing_class=tok)),
        ("cpo", {"beta": 2.0, "loss_type": "simpo", "simpo_gamma": 0.5, "cpo_alpha": 0.0},
         lambda a: CPOTrainer(model=load("tiny-llama"), args=CPOConfig(output_dir=tempfile.mkdtemp(), **a, **common),
                              train_dataset=ds(), eval_dataset=ds(), processing_class=tok)),
    ]
    # Policy and reference swapped: a positive KL estimate (it is clamped at 0 above).
    runs.append(("kto", {"beta": 0.1, "policy": "tiny-qwen2", "ref_model": "tiny-llama"},
                 lambda a: KTOTrainer(model=load("tiny-qwen2"), ref_model=load("tiny-llama"),
                                      args=KTOConfig(output_dir=tempfile.mkdtemp(), beta=0.1, **common),
                                      train_dataset=ds(), eval_dataset=ds(), processing_class=tok)))
    if data.startswith("thumbs"):
        runs = [r for r in runs if r[0] == "kto"]
    for trainer, args, make in runs:
        metrics = make(args).evaluate()
        out["cases"].append({"data": data, "trainer": trainer, "args": args,
                             "metrics": {k: v for k, v in metrics.items() if isinstance(v, float)}})
        print(data, trainer, args, metrics["eval_loss"])

# The losses as functions of the sequence log-probs, with their gradients (f64).
dev = torch.device("cpu")
fake = lambda **kw: types.SimpleNamespace(accelerator=types.SimpleNamespace(device=dev), **kw)
chosen = [-1.3, -0.2, -2.5, -0.01, -0.9]
rejected = [-1.1, -0.8, -2.0, -0.05, -3.0]
out["losses"]["inputs"] = {"chosen": chosen, "rejected": rejected}


def grads(f):
    c = torch.tensor(chosen, dtype=torch.float64, requires_grad=True)
    r = torch.tensor(rejected, dtype=torch.float64, requires_grad=True)
    res = f(c, r)
    res[0].sum().backward()
    return res, c.grad.tolist(), r.grad.tolist()


cases = []
for beta in [0.1, 1.0]:
    (losses, rw, rl, ratio, log_odds), gc, gr = grads(
        lambda c, r: ORPOTrainer.odds_ratio_loss(fake(beta=beta), c, r))
    cases.append({"loss": "orpo", "beta": beta, "losses": losses.tolist(), "chosen_rewards": rw.tolist(),
                  "rejected_rewards": rl.tolist(), "log_odds_ratio": ratio.item(), "log_odds_chosen": log_odds.item(),
                  "grad_chosen": gc, "grad_rejected": gr})
for loss_type, beta, ls, alpha in [("sigmoid", 0.1, 0.0, 0.0), ("sigmoid", 0.5, 0.1, 0.0), ("hinge", 0.5, 0.0, 0.0),
                                   ("ipo", 0.5, 0.0, 0.0), ("simpo", 2.0, 0.0, 0.0), ("simpo", 2.0, 0.1, 0.0),
                                   ("simpo", 2.0, 0.0, 0.25)]:
    f = fake(beta=beta, loss_type=loss_type, label_smoothing=ls, simpo_gamma=0.5, alpha=alpha)
    (losses, rw, rl), gc, gr = grads(lambda c, r: CPOTrainer.cpo_loss(f, c, r))
    cases.append({"loss": "cpo", "loss_type": loss_type, "beta": beta, "label_smoothing": ls, "simpo_gamma": 0.5,
                  "alpha": alpha, "losses": losses.tolist(), "chosen_rewards": rw.tolist(),
                  "rejected_rewards": rl.tolist(), "grad_chosen": gc, "grad_rejected": gr})
out["losses"]["cases"] = cases
json.dump(out, open(os.path.join(ROOT, "fixtures/golden/po-eval.json"), "w"), indent=1)
