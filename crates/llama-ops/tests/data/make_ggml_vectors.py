"""Known-answer vectors for the GGUF block formats, from gguf-py (llama.cpp's Python package,
the code transformers uses to dequantise GGUF files): random blocks with sane f16 scales and
their dequantised values, and f32 rows with the bytes gguf-py's quantisers make of them.

    pip install gguf==0.19.0 && python3 make_ggml_vectors.py > ggml_vectors.json
"""
import json

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

rng = np.random.default_rng(20261126)
# type -> byte offsets of its f16 scale fields within a block
SCALES = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q8_0: [0], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}
out = {"dequantize": [], "quantize": []}
for qtype, offsets in SCALES.items():
    block_len, block_bytes = quants.GGML_QUANT_SIZES[qtype]
    n_blocks = 3
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in offsets:
        scale = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
        raw[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    values = quants.dequantize(raw.reshape(-1), qtype).reshape(-1)
    out["dequantize"].append({"type": qtype.name, "bytes": raw.tobytes().hex(),
                              "values": [float(v) for v in values.astype(np.float32)]})
for qtype in (T.Q4_0, T.Q4_1, T.Q8_0):
    block_len, _ = quants.GGML_QUANT_SIZES[qtype]
    x = rng.normal(0, 1, size=(2, 4 * block_len)).astype(np.float32)
    x[1, :block_len] = 0.0  # an all-zero block
    q = quants.quantize(x, qtype)
    out["quantize"].append({"type": qtype.name, "cols": 4 * block_len,
                            "input": [float(v) for v in x.reshape(-1)], "bytes": q.tobytes().hex()})
print(json.dumps(out))
