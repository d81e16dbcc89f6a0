"""Faster R-CNN (MobileNetV3, 320 px) for the object_detector example, written to the folder
given as argument. torchvision's architecture with random weights, slightly jittered so that
some boxes score over the 0.5 threshold; the detections mean nothing, but they are named: the
91 COCO category names come from torchvision's weights metadata (no download), in TorchServe's
index_to_name.json form. Also writes a photo.
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
model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
    weights=None, weights_backbone=None
).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
torch.jit.script(model).save(str(out / "detector.pt"))
names = torchvision.models.detection.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1.meta["categories"]
(out / "index_to_name.json").write_text(json.dumps({str(i): n for i, n in enumerate(names)}))
Image.fromarray(data.astronaut()).save(out / "astronaut.jpg", quality=90)
