"""Compares two first-update dumps (PREFTUNE_DUMP_FIRST_UPDATE) of the same run on two devices.
Prints one JSON line: the loss's relative difference and, over every parameter, the worst
max|g_a - g_b| / max|g_a| (each parameter's gradient against its own scale), with the bars
(loss 1e-4 relative, or absolute below 1e-2; gradients 1e-3). With a 4th argument `bf16` (runs
under `bf16 = true`) the bars are bf16's: loss 1e-2 relative, and all gradients together within
0.1 in relative L2 (the GPU's products store bf16 outputs, the CPU's GEMM keeps f32 sums; the CPU
measured 2.8% for SFT and 4.8% for DPO between the two code paths).
Usage: compare_updates.py A B LABEL [bf16]"""
import json, sys
import numpy as np
from safetensors.numpy import load_file
from safetensors import safe_open

a_path, b_path, label = sys.argv[1:4]
bf16 = sys.argv[4:5] == ["bf16"]
a, b = load_file(a_path), load_file(b_path)
def loss(p):
    with safe_open(p, "np") as f:
        return float(f.metadata()["loss"])
la, lb = loss(a_path), loss(b_path)
# A loss that is zero in exact arithmetic (RLOO's at the first step) is compared absolutely.
loss_rel = abs(la - lb) / max(abs(la), 1e-2)
assert set(a) == set(b), f"parameters differ: {sorted(set(a) ^ set(b))[:5]}"
worst, worst_name, zero = 0.0, "", 0
sq_diff, sq_norm = 0.0, 0.0
for k in a:
    if k == "loss":
        continue
    sq_diff += float(((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2).sum())
    sq_norm += float((a[k].astype(np.float64) ** 2).sum())
    scale = float(np.abs(a[k]).max())
    d = float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max())
    if scale == 0.0:
        zero += 1
        r = 0.0 if d == 0.0 else float("inf")
    else:
        r = d / scale
    if r > worst:
        worst, worst_name = r, k
# A step whose gradients are all zero (every advantage zero, say) proves nothing.
rel_l2 = (sq_diff / sq_norm) ** 0.5 if sq_norm > 0 else float("inf")
if bf16:
    ok = loss_rel <= 1e-2 and rel_l2 <= 0.1 and zero < len(a) - 1
else:
    ok = loss_rel <= 1e-4 and worst <= 1e-3 and zero < len(a) - 1
print(json.dumps({"check": label, "ok": ok, "bf16": bf16, "loss_a": la, "loss_b": lb, "loss_rel_diff": loss_rel,
                  "params": len(a) - 1, "zero_grad_params": zero, "worst_grad_rel_diff": worst,
                  "worst_param": worst_name, "grad_rel_l2": rel_l2}))
sys.exit(0 if ok else 1)
