"""A SentencePiece-vocabulary GGUF (`tokenizer.ggml.model = llama`, as Llama 2, Mistral v0.1 and
TinyLlama files carry) and the ids its tokenizer gives: sentencepiece trains a small BPE model
with byte fallback on the repository's LICENSE, gguf-py writes its pieces, scores and types into
a GGUF holding no tensors, and the reference ids are HF transformers' (its GGUF loader,
`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, BOS first); sentencepiece's own ids are kept
beside them: they differ where HF's merge table does (runs of spaces).

    pip install sentencepiece gguf transformers tokenizers && python3 make_spm_tokenizer.py
"""
import json
import os
import pathlib
import tempfile

import gguf
import sentencepiece as spm
import transformers
from transformers import AutoTokenizer

here = pathlib.Path(__file__).parent
licence = (here / "../../../../LICENSE").read_text()
with tempfile.TemporaryDirectory() as tmp:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(licence.splitlines()), model_prefix=f"{tmp}/m", vocab_size=800,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    sp = spm.SentencePieceProcessor(model_file=f"{tmp}/m.model")

def token_type(i):
    if sp.is_unknown(i):
        return gguf.TokenType.UNKNOWN
    if sp.is_control(i):
        return gguf.TokenType.CONTROL
    if sp.is_byte(i):
        return gguf.TokenType.BYTE
    if sp.is_unused(i):
        return gguf.TokenType.UNUSED
    return gguf.TokenType.NORMAL

path = here / "spm-tokenizer.gguf"
writer = gguf.GGUFWriter(str(path), "llama")
writer.add_context_length(64)
writer.add_tokenizer_model("llama")
writer.add_token_list([sp.id_to_piece(i).encode() for i in range(sp.get_piece_size())])
writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
writer.add_token_types([token_type(i) for i in range(sp.get_piece_size())])
writer.add_bos_token_id(1)
writer.add_eos_token_id(2)
writer.add_unk_token_id(0)
writer.add_add_bos_token(True)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()

hf = AutoTokenizer.from_pretrained(str(here), gguf_file=path.name)
texts = [
    "Licensed under the Apache License, Version 2.0",
    "  two leading spaces, and  two inside",
    "line one\nline two\n\n\tTabbed",
    "Digits 2026-11-27 and 3.14159",
    "Bytes for what the vocabulary lacks: 日本語, café, 😀",
    "ending in a space ",
    "",
    "x",
]
cases = []
for text in texts:
    ids = hf(text)["input_ids"]
    assert ids[0] == 1 and hf(text, add_special_tokens=False)["input_ids"] == ids[1:]
    cases.append({"text": text, "ids": ids[1:], "decoded": hf.decode(ids[1:]),
                  "sentencepiece_ids": sp.encode(text)})
out = {"made_with": {"sentencepiece": spm.__version__, "transformers": transformers.__version__,
                     "gguf": gguf.__version__ if hasattr(gguf, "__version__") else "?"},
       "bos_id": 1, "cases": cases}
(here / "spm_tokenizer.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
print(f"{path.name}: {os.path.getsize(path)} bytes, {sp.get_piece_size()} pieces, {len(cases)} cases")
