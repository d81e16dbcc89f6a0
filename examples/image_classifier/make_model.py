"""ResNet-18 for the image_classifier example, written to the folder given as argument.

torchvision's architecture with random weights (nothing is downloaded), so the predicted labels
mean nothing; swap in your own trained model and labels. Also writes a photo to classify
(scikit-image's chelsea the cat) and index_to_name.json in TorchServe's form.
"""

import json
import sys
from pathlib import Path

import torch
import torchvision
from PIL import Image
from skimage import data

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
model = torchvision.models.resnet18(weights=None).eval()
torch.jit.script(model).save(str(out / "resnet18.pt"))
labels = {str(i): [f"n{i:08d}", f"class_{i}"] for i in range(1000)}
(out / "index_to_name.json").write_text(json.dumps(labels))
Image.fromarray(data.chelsea()).save(out / "cat.jpg", quality=90)
