#!/usr/bin/env python3
"""A GGUF file holding one small tensor of each block-quantised type preftune reads (the K-quants
Q2_K-Q6_K, and Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), and gguf-py's dequantisation of each: the golden
for crates/model/tests/block_quants.rs. Real models' K-quant files are too big for fixtures, and
tiny models are too narrow for 256-value blocks.

Every block is random bytes (any bit pattern is a valid block) with its f16 scales set to small
finite values, so that every quant and sub-scale pattern occurs. Each tensor is [3, 512]: two
K-quant blocks or sixteen 32-value blocks per row.

Run from the repository root with the reference venv (gguf==0.19.0, numpy, safetensors):
    .venv/bin/python scripts/parity/make_block_quant_gguf.py fixtures/models/block-quants.gguf \
        fixtures/golden/block-quants.safetensors
"""
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from safetensors.numpy import save_file

ROWS, COLS = 3, 512

# Byte offsets of each block's f16 scale fields (ggml-common.h's block layouts).
F16_FIELDS = {
    T.Q2_K: [80, 82],  # scales[16], qs[64], d, dmin
    T.Q3_K: [108],  # hmask[32], qs[64], scales[12], d
    T.Q4_K: [0, 2],  # d, dmin, scales[12], qs[128]
    T.Q5_K: [0, 2],  # d, dmin, scales[12], qh[32], qs[128]
    T.Q6_K: [208],  # ql[128], qh[64], scales[16], d
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
}


def main(out_gguf, out_golden):
    rng = np.random.default_rng(20261206)
    writer = gguf.GGUFWriter(out_gguf, "block-quants")
    golden = {}
    for qtype, fields in F16_FIELDS.items():
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = ROWS * COLS // block_size
        raw = rng.integers(0, 256, size=(blocks, type_size), dtype=np.uint8)
        for k, off in enumerate(fields):
            # d around 0.01-0.05, dmin half that: finite, and far from f16's limits.
            scale = rng.uniform(0.01, 0.05, size=blocks).astype(np.float16) / (1 + k)
            raw[:, off:off + 2] = scale.view(np.uint8).reshape(blocks, 2)
        raw = raw.reshape(ROWS, COLS // block_size * type_size)
        name = qtype.name.lower()
        writer.add_tensor(name, raw, raw_dtype=qtype)
        golden[name] = gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(ROWS, COLS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file(golden, out_golden, metadata={"made_by": "scripts/parity/make_block_quant_gguf.py",
                                            "gguf": gguf.__name__ + " 0.19.0"})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
