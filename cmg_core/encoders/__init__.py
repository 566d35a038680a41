"""Frozen text encoder (captions) and image backbones."""
from .image import BACKBONES, BackboneSpec, Normalize, build_backbone
from .text import DEFAULT_TEXT_MODEL, TextEncoder

__all__ = ["BACKBONES", "BackboneSpec", "DEFAULT_TEXT_MODEL", "Normalize", "TextEncoder", "build_backbone"]
