"""Frozen text encoder (captions) and image backbones (built-in, and timm / open_clip / Hugging Face: `.hub`)."""
from .image import BACKBONES, BackboneSpec, Normalize, build_backbone, trunk_key_parts, trunk_settings
from .text import DEFAULT_TEXT_MODEL, TextEncoder, caption_tensor

__all__ = ["BACKBONES", "BackboneSpec", "DEFAULT_TEXT_MODEL", "Normalize", "TextEncoder", "build_backbone",
           "caption_tensor", "trunk_key_parts", "trunk_settings"]
