"""Models for the benchmarks, written to the folder given as argument.

mlp.pt        784-128-10 MLP (random weights), float32 [N, 784] -> [N, 10]
resnet18.pt   torchvision ResNet-18 (random weights), float32 [N, 3, 224, 224] -> [N, 1000]
pool.pt       the mean of each channel, float32 [N, 3, 224, 224] -> [N, 3]: a model that costs
              nothing, so a run measures the serving path of a 224x224 image tensor alone
wide.pt       the channel means through a fixed 3x1000 projection, float32 [N, 3, 224, 224] ->
              [N, 1000]: as cheap as pool.pt, with an answer as long as ResNet-18's
mlp.json      one MLP request body: {"data": [784 floats]}
resnet18.bin  one ResNet-18 input as raw little-endian float32 bytes
cat640.jpg    a 640x480 JPEG photo (scikit-image's chelsea), for the image_classifier runs
"""

import json
import sys
from pathlib import Path

import torch
import torchvision
from PIL import Image
from skimage import data


class ChannelMean(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class ChannelSpread(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("proj", torch.randn(3, 1000, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # sin() spreads the values over every exponent and digit count a real answer has.
        return torch.sin(x.mean(dim=(2, 3)) @ self.proj * 7.0)


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The MLP and ResNet-18, with the same weights every time (bench/make_pt2.py exports them)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).eval()
    resnet = torchvision.models.resnet18(weights=None).eval()
    return mlp, resnet


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mlp, resnet = models()
    torch.jit.script(mlp).save(str(out / "mlp.pt"))
    torch.jit.script(resnet).save(str(out / "resnet18.pt"))
    torch.jit.script(ChannelMean()).save(str(out / "pool.pt"))
    torch.jit.script(ChannelSpread()).save(str(out / "wide.pt"))
    x = torch.rand(784)
    (out / "mlp.json").write_text(json.dumps({"data": [round(float(v), 6) for v in x]}))
    torch.rand(3, 224, 224).numpy().astype("<f4").tofile(out / "resnet18.bin")
    Image.fromarray(data.chelsea()).resize((640, 480), Image.BILINEAR).save(out / "cat640.jpg", quality=90)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
