# Loads fastllama's adapters with peft and fastllama's merged models with transformers, and
# compares their logits with the ones fastllama computed (relative error, printed as JSON).
# ROOT holds base/ (an HF model directory) and, for each adapter A in ["lora", "lora_mts"]:
# A/ (`fastllama finetune --out`), A.safetensors (`fastllama logits --adapter A --out`) and
# A_merged/ (`fastllama merge --adapter A --out`). Usage: peft_roundtrip.py ROOT
# (docs/guide/finetune.md shows the commands; any Python with torch, transformers and peft).
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from peft import PeftModel
root = sys.argv[1]
out = {}
for a in ["lora", "lora_mts"]:
    ref = load_file(f"{root}/{a}.safetensors")
    ids = ref["ids"].unsqueeze(0)
    want = ref["logits"]
    base = AutoModelForCausalLM.from_pretrained(f"{root}/base", dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, f"{root}/{a}")
    with torch.no_grad():
        got = pm(input_ids=ids).logits[0]
    merged = AutoModelForCausalLM.from_pretrained(f"{root}/{a}_merged", dtype=torch.float32)
    with torch.no_grad():
        got2 = merged(input_ids=ids).logits[0]
    rel = lambda x: ((x - want).norm() / want.norm()).item()
    out[a] = {"peft_rel_error": rel(got), "merged_rel_error": rel(got2)}
print(json.dumps(out))
