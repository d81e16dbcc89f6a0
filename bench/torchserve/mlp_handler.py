"""TorchServe handler for the benchmark MLP: the counterpart of bench/mlp_handler.json.

A request body is {"data": [784 numbers]} (or the bare list); the answer is the model's 10
outputs as a JSON list, one per request of the batch.
"""

import json

import torch
from ts.torch_handler.base_handler import BaseHandler


class MLPHandler(BaseHandler):
    def preprocess(self, data):
        rows = []
        for request in data:
            body = request.get("body", request.get("data"))
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            if isinstance(body, dict):
                body = body["data"]
            rows.append(torch.tensor(body, dtype=torch.float32))
        return torch.stack(rows).to(self.device)

    def postprocess(self, data):
        return data.tolist()
