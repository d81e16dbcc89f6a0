"""Trains a small digit classifier on scikit-learn's digits and exports it to TorchScript.

Writes into the folder given as the first argument:
  digits.pt        the TorchScript module: float32 [N, 64] pixels (0-16) -> [N, 10] logits
  test.json        the held-out digits: {"inputs": [[64 floats], ...], "labels": [...]}
  expected.json    PyTorch's logits for those inputs and its accuracy on them
"""

import json
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


class DigitsMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(64, 64),
            torch.nn.ReLU(),
            torch.nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pixels arrive as 0-16 intensities, the form the dataset ships in.
        return self.layers(x / 16.0)


def train() -> tuple:
    """The trained classifier (in eval mode) and the held-out digits and labels."""
    torch.manual_seed(0)
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    x_train = torch.tensor(x_train, dtype=torch.float32)
    y_train = torch.tensor(y_train, dtype=torch.int64)

    model = DigitsMLP()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x_train), y_train)
        loss.backward()
        optimiser.step()
    return model.eval(), x_test, y_test


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model, x_test, y_test = train()
    x_test_t = torch.tensor(x_test, dtype=torch.float32)

    scripted = torch.jit.script(model)
    scripted.save(str(out / "digits.pt"))
    with torch.no_grad():
        logits = scripted(x_test_t)
    accuracy = float((logits.argmax(dim=1).numpy() == y_test).mean())
    (out / "test.json").write_text(
        json.dumps({"inputs": x_test.tolist(), "labels": y_test.tolist()})
    )
    (out / "expected.json").write_text(
        json.dumps({"logits": logits.tolist(), "accuracy": accuracy})
    )
    print(f"digits: held-out accuracy {accuracy:.4f} on {len(y_test)} images")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
