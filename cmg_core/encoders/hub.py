"""Frozen trunks from model hubs: any timm model, an open_clip image tower, a Hugging Face vision model.

`model.trunk` names one as `<family>:<name>` (docs/backbones.md):

* `timm:<name>` - `timm.create_model(name)`, any timm name with or without a pretrained tag. Weights: the local
  file `model.trunk_weights` (a state dict or safetensors file, which timm loads through
  `pretrained_cfg_overlay=dict(file=...)`, its checkpoint filters included), else with `pretrained: true` timm's
  hub (internet or its cache), else random. Normalised with the model's pretrained_cfg mean/std. Native pooling:
  timm's head up to the classifier, `forward_head(pre_logits=True)` (global pool and any head norm / pre-logits
  layer). ViT-like models are built with `dynamic_img_size=True` (any input size); the others take any size
  unless their pretrained_cfg says `fixed_input_size`.
* `open_clip:<arch>` - the image tower of an open_clip CLIP; `arch` an open_clip architecture name or a
  model-config JSON file (as `bliss.clip_model`), its weights the checkpoint file `model.trunk_weights`
  (required). Normalised with the tower's preprocess_cfg (OpenAI's mean/std by default). Native pooling: the
  tower's image embedding (its pool - the class token for ViTs - and projection; not L2-normalised). Input
  size: fixed, the tower's image_size.
* `hf:<folder or hub id>` - transformers `AutoModel` (its `vision_model` where it has one: CLIP, SigLIP), weights
  from the folder (`save_pretrained`) or the hub; `pretrained: false` builds it from its config, randomly
  initialised. Normalised with image_mean/image_std of its preprocessor_config.json, else ImageNet's. Native
  pooling: the model's `pooler_output` where it has one whose weights the checkpoint holds (DINOv2: the
  normalised CLS token; SigLIP: its attention-pooling head; CLIP: the normalised CLS token), else the CLS token
  (the first token when the sequence is longer than the patch grid), else the mean of the patch tokens (of the
  feature maps for CNNs). Any input size (`interpolate_pos_encoding=True` where the model takes it).

Pooling `maps` (the trunk of `cmer.apply: feature`, `cmg_core.train.frozen.build_trunk`): the features are the
mean of the trunk's feature maps instead - a CNN's last maps, or a ViT's patch tokens after the final norm (prefix
tokens dropped) as a (B, C, h, w) grid - so leaving a region's cells out of that mean (features.masked_average_pool)
is exact and agrees with the unmasked features. open_clip towers other than ViTs, and models without a patch grid
(e.g. Swin), have no such maps: ConfigError asking for `cmer.apply: pixel`.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from ..config import check_trunk
from ..errors import ConfigError
from .clip import _pair
from .spec import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec

POOLS = ("native", "maps")


def tokens_to_maps(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor | None:
    """(B, N, C) ViT tokens whose last h*w are the patch grid (row-major; prefix tokens first) -> (B, C, h, w);
    None when there are fewer than h*w tokens (no such grid)."""
    h, w = grid
    if tokens.dim() != 3 or not 0 < h * w <= tokens.shape[1]:
        return None
    return tokens[:, tokens.shape[1] - h * w :].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


class HubTrunk(nn.Module):
    """A hub model as a frozen trunk: (B, 3, H, W) normalised images -> (B, F) features (`forward`), with pooling
    `native` the family's pooled features, with `maps` the mean of `feature_maps` (B, F, h, w).

    Subclasses give `native(x)` and `maps(x)` (None where the model has no grid of feature maps)."""

    def __init__(self, name: str, net: nn.Module, pool: str, num_features: int,
                 fixed_size: tuple[int, int] | None = None):
        super().__init__()
        self.name, self.pool, self.num_features, self.fixed_size = name, pool, int(num_features), fixed_size
        self.net = net.float()  # the trunk's precision is Trunk's autocast, not the checkpoint's dtype

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_size is not None and tuple(x.shape[-2:]) != tuple(self.fixed_size):
            h, w = self.fixed_size
            raise ConfigError(f"model.trunk={self.name!r} takes {h} x {w} images, got {x.shape[-2]} x {x.shape[-1]}: "
                              f"set model.trunk_image_size: {h}")
        return x

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, F, h, w) feature maps whose mean over (h, w) is `forward` (pooling `maps` only)."""
        if self.pool != "maps":
            raise ConfigError(f"trunk {self.name!r} was built with its native pooling, not the mean of feature maps; "
                              "cmer.apply: feature needs pool='maps' (what build_trunk picks for it)")
        maps = self.maps(self._checked(x))
        if maps is None:
            raise ConfigError(f"trunk {self.name!r} has no grid of feature maps to leave a region out of; "
                              "use cmer.apply: pixel")
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "maps":
            return self.feature_maps(x).mean((-2, -1))
        return self.native(self._checked(x))


class TimmTrunk(HubTrunk):
    """A timm model: native pooling `forward_head(pre_logits=True)`; maps from `forward_features` (NCHW, or a ViT's
    patch tokens on the patch grid)."""

    def __init__(self, name: str, model: nn.Module, pool: str, fixed_size: tuple[int, int] | None):
        dim = model.num_features if pool == "maps" else getattr(model, "head_hidden_size", None) or model.num_features
        super().__init__(name, model, pool, dim, fixed_size)

    def native(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def maps(self, x: torch.Tensor) -> torch.Tensor | None:
        out = self.net.forward_features(x)
        if out.dim() == 4:
            return out.permute(0, 3, 1, 2) if getattr(self.net, "output_fmt", "NCHW") == "NHWC" else out
        patch = getattr(getattr(self.net, "patch_embed", None), "patch_size", None)
        return None if patch is None else tokens_to_maps(out, (x.shape[-2] // patch[0], x.shape[-1] // patch[1]))


class OpenClipTower(HubTrunk):
    """An open_clip image tower: native pooling its image embedding; maps (ViTs) its last block's patch tokens."""

    def __init__(self, name: str, visual: nn.Module, pool: str):
        from open_clip.transformer import VisionTransformer

        if pool == "maps" and not isinstance(visual, VisionTransformer):
            raise ConfigError(f"model.trunk={name!r}: only open_clip ViT towers give feature maps (patch tokens); "
                              "use cmer.apply: pixel")
        dim = visual.transformer.width if pool == "maps" else visual.output_dim
        super().__init__(name, visual, pool, dim, _pair(visual.image_size))

    def native(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net.forward_intermediates(x, indices=1, normalize_intermediates=True, intermediates_only=True)
        return out["image_intermediates"][-1]  # (B, width, h, w) last block's patch tokens after ln_post


class HFVision(HubTrunk):
    """A transformers vision model: native pooling pooler output > CLS token > mean of the patch tokens; maps its
    last hidden state (a CNN's maps, or the patch tokens on the patch grid)."""

    def __init__(self, name: str, model: nn.Module, pool: str, use_pooler: bool):
        c = model.config
        super().__init__(name, model, pool, getattr(c, "hidden_size", None) or c.hidden_sizes[-1])
        self.use_pooler = use_pooler
        self.patch = _pair(c.patch_size) if getattr(c, "patch_size", None) else None
        self.kwargs = ({"interpolate_pos_encoding": True}
                       if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters else {})

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int] | None]:
        """(last hidden state (B, N, C) or (B, C, h, w), pooler output or None, patch grid (h, w) or None)."""
        out = self.net(pixel_values=x, **self.kwargs)
        grid = None if self.patch is None else (x.shape[-2] // self.patch[0], x.shape[-1] // self.patch[1])
        return out.last_hidden_state, getattr(out, "pooler_output", None), grid

    def native(self, x: torch.Tensor) -> torch.Tensor:
        hidden, pooled, grid = self._run(x)
        if self.use_pooler and pooled is not None:
            return pooled.flatten(1)  # (B, C) or a CNN's (B, C, 1, 1)
        if hidden.dim() == 4:
            return hidden.mean((-2, -1))
        n_patches = grid[0] * grid[1] if grid else hidden.shape[1]
        if hidden.shape[1] > n_patches:
            return hidden[:, 0]  # CLS
        return hidden.mean(1)

    def maps(self, x: torch.Tensor) -> torch.Tensor | None:
        hidden, _, grid = self._run(x)
        if hidden.dim() == 4:
            return hidden
        return None if grid is None else tokens_to_maps(hidden, grid)


def _timm(trunk: str, ref: str, pretrained: bool, weights: str | None, pool: str):
    import timm

    if not timm.is_model(ref) and ":" not in ref:  # timm's own schemes (hf-hub:, local-dir:) go to timm
        raise ConfigError(f"model.trunk={trunk!r}: {ref!r} is not a timm model (see timm.list_models())")
    kw = {"pretrained": pretrained}
    if weights:
        kw["pretrained_cfg_overlay"] = {"file": str(weights)}
    try:
        try:
            model, dynamic = timm.create_model(ref, dynamic_img_size=True, **kw), True
        except TypeError:  # not ViT-like: no position embeddings to interpolate
            model, dynamic = timm.create_model(ref, **kw), False
    except (RuntimeError, OSError, ValueError, TypeError, KeyError) as exc:
        hint = ("check that model.trunk_weights is a state dict of this model" if weights else
                "set model.trunk_weights to a local weights file, or pretrained: false for random weights"
                if pretrained else "")
        raise ConfigError(f"model.trunk={trunk!r}: timm could not build it ({type(exc).__name__}: "
                          f"{str(exc)[:300]}); {hint}") from exc
    cfg = model.pretrained_cfg
    fixed = None if dynamic or not cfg.get("fixed_input_size") else tuple(cfg["input_size"][1:])
    data = timm.data.resolve_model_data_config(model)
    return TimmTrunk(trunk, model, pool, fixed), tuple(data["mean"]), tuple(data["std"])


def _open_clip_tower(trunk: str, ref: str, pretrained: bool, weights: str | None, pool: str):
    try:
        import open_clip
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    except ImportError as exc:
        raise ConfigError(f"model.trunk={trunk!r} needs open_clip: pip install open_clip_torch") from exc
    if not weights:
        raise ConfigError(f"model.trunk={trunk!r} needs model.trunk_weights: a checkpoint file of {ref}")
    name = ref
    if Path(ref).suffix == ".json":  # a model config of one's own, as bliss.clip_model takes it
        if not Path(ref).is_file():
            raise ConfigError(f"model.trunk={trunk!r}: no such model-config file {ref}")
        open_clip.add_model_config(ref)
        name = Path(ref).stem
    if open_clip.get_model_config(name) is None:
        raise ConfigError(f"model.trunk={trunk!r}: {name!r} is not an open_clip architecture; expected one of "
                          "open_clip.list_models() or a model-config JSON file")
    try:
        visual = open_clip.create_model(name, pretrained=str(weights), device="cpu").visual
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        raise ConfigError(f"model.trunk={trunk!r}: could not load model.trunk_weights={weights!r} "
                          f"({type(exc).__name__}: {str(exc)[:300]})") from exc
    pre = getattr(visual, "preprocess_cfg", None) or {}
    mean, std = pre.get("mean", OPENAI_DATASET_MEAN), pre.get("std", OPENAI_DATASET_STD)
    return OpenClipTower(trunk, visual, pool), tuple(mean), tuple(std)


def _hf_normalisation(src: str) -> tuple[tuple, tuple]:
    """(mean, std) of the image processor config of `src` (preprocessor_config.json), else ImageNet's."""
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        proc = ImageProcessingMixin.get_image_processor_dict(src)[0]
    except OSError:  # no preprocessor_config.json
        return IMAGENET_MEAN, IMAGENET_STD
    if not proc.get("do_normalize", True):
        return (0.0,) * 3, (1.0,) * 3
    return tuple(proc.get("image_mean", IMAGENET_MEAN)), tuple(proc.get("image_std", IMAGENET_STD))


def hf_source(trunk: str, ref: str) -> str:
    """The folder (resolved) or hub id an `hf:` trunk loads from; ConfigError for a path that is no folder or one
    without config.json."""
    local = Path(ref).expanduser()
    if not local.exists() and not ref.startswith((".", "/", "~")):
        return ref
    if not local.is_dir():
        raise ConfigError(f"model.trunk={trunk!r}: no such folder {local}")
    if not (local / "config.json").is_file():
        raise ConfigError(f"model.trunk={trunk!r}: {local} has no config.json; expected a folder written by "
                          "transformers' save_pretrained (or a hub id such as facebook/dinov2-small)")
    return str(local.resolve())


def _hf(trunk: str, ref: str, pretrained: bool, weights: str | None, pool: str):
    import transformers

    src = hf_source(trunk, ref)
    try:
        if pretrained:
            model, info = transformers.AutoModel.from_pretrained(src, output_loading_info=True)
        else:
            model, info = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(src)), {}
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"model.trunk={trunk!r}: transformers could not load it ({type(exc).__name__}: "
                          f"{str(exc)[:300]}); expected a local folder with config.json and weights, or a hub id "
                          "(needs internet or the hub cache)") from exc
    missing = sorted(info.get("missing_keys", ()))
    no_pooler = [k for k in missing if "pooler" in k.split(".")]  # e.g. a ViT checkpoint saved without its pooler
    if len(no_pooler) < len(missing):
        raise ConfigError(f"model.trunk={trunk!r}: the checkpoint lacks {len(missing) - len(no_pooler)} of the "
                          f"model's tensors (e.g. {[k for k in missing if k not in no_pooler][:3]}), so they would be "
                          "random; expected weights of this architecture")
    vision = getattr(model, "vision_model", model)  # CLIP / SigLIP: the image tower
    mean, std = _hf_normalisation(src)
    return HFVision(trunk, vision, pool, use_pooler=not no_pooler), mean, std


BUILDERS = {"timm": _timm, "open_clip": _open_clip_tower, "hf": _hf}


def build_hub_backbone(trunk: str, pretrained: bool = True, weights: str | None = None,
                       pool: str = "native") -> tuple[HubTrunk, BackboneSpec]:
    """A `<family>:<name>` trunk (see the module docstring) and its spec; ConfigError naming the setting for an
    unknown family or model, a missing weights file, or weights that do not fit."""
    check_trunk(trunk, weights, pretrained)
    if pool not in POOLS:
        raise ConfigError(f"pool={pool!r}; expected one of {list(POOLS)}")
    if weights and not Path(weights).is_file():
        raise ConfigError(f"model.trunk_weights={weights!r}: no such file (expected a local weights file of "
                          f"{trunk!r})")
    family, _, ref = trunk.partition(":")
    net, mean, std = BUILDERS[family](trunk, ref, pretrained, weights, pool)
    return net.eval(), BackboneSpec(trunk, net.num_features, mean, std, pretrained)
