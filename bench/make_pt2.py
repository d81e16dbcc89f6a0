"""The benchmark models of bench/make_models.py as .pt2 packages, written to the folder given as
argument, for bench/pt2.sh to serve beside their TorchScript files:

mlp.pt2            the MLP, a dynamic batch (example batch 8)
resnet18.pt2       ResNet-18, a dynamic batch (example batch 8)
resnet18_b1.pt2    ResNet-18 with a fixed batch of 1
Each is checked against its TorchScript file in bench/make_models.py's output folder, so that
both formats hold the same model.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_models import models  # noqa: E402


def compile_package(model: torch.nn.Module, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    with torch.no_grad():
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            program = torch.export.export(model, (example,), dynamic_shapes=shapes)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    script = torch.jit.load(str(path.parent / (path.stem.split("_b1")[0] + ".pt")))
    package = torch._inductor.aoti_load_package(str(path))
    with torch.no_grad():
        x = torch.rand_like(example)
        diff = (script(x) - package(x)).abs().max().item()
    assert diff < 1e-4, f"{path.name} differs from its TorchScript file by {diff}"


def main(out: Path) -> None:
    mlp, resnet = models()
    compile_package(mlp, torch.rand(8, 784), out / "mlp.pt2", dynamic=True)
    compile_package(resnet, torch.rand(8, 3, 224, 224), out / "resnet18.pt2", dynamic=True)
    compile_package(resnet, torch.rand(1, 3, 224, 224), out / "resnet18_b1.pt2", dynamic=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
