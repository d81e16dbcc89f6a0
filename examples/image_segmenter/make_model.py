"""LR-ASPP (MobileNetV3) for the image_segmenter example, written to the folder given as
argument: torchvision's architecture, 21 classes, random weights. Also writes a photo.
"""

import sys
from pathlib import Path

import torch
import torchvision
from PIL import Image
from skimage import data

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
    weights=None, weights_backbone=None, num_classes=21
).eval()
torch.jit.script(model).save(str(out / "segmenter.pt"))
Image.fromarray(data.coffee()).save(out / "coffee.png")
