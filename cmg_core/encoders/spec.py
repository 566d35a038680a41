"""What describes an image trunk, for the built-in backbones (.image) and the hub trunks (.hub) alike: its
`BackboneSpec` (feature dim, input normalisation, whether its weights are pretrained) and ImageNet's mean/std.
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pretrained: bool
