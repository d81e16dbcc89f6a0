"""LR-ASPP (MobileNetV3) for the image_segmenter example, written to the folder given as
argument: torchvision's architecture, 21 classes, random weights. Also writes a photo and the
21 Pascal VOC class names (from torchvision's weights metadata, no download) that query.sh
names the answer's classes with.
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
model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
    weights=None, weights_backbone=None, num_classes=21
).eval()
torch.jit.script(model).save(str(out / "segmenter.pt"))
names = torchvision.models.segmentation.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1.meta["categories"]
(out / "voc_labels.json").write_text(json.dumps(names))
Image.fromarray(data.coffee()).save(out / "coffee.png")
