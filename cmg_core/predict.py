"""Score new images with a finished run: RID picks the mask (no captions), E2 + detector give the score.

    pred = Predictor.load("runs/my_run")
    res = pred.explain(pil_image)   # variants, rid_probs, rid_choice, masked_image, scores, percentiles,
                                    # thresholds (calibrated: detector.fpr of normal images above), anomalous

One class for both profiles, with the same straight line as training: RID's inputs come from the run's E1
encoder (the frozen trunk's features, masked as the run masked them, or E1's backbone when it was trained end to
end); each method's detector features come from its E2 (a head on trunk features, or an encoder on the image,
RID-masked for ER methods).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .artifacts import load_model, model_path
from .data.images import open_image
from .detector import detector_from_state
from .errors import CMGError, DataError
from .features import images_to_tensor, masked_variants, to_float, to_trunk_size
from .masks import grid_masks
from .models import RID, E2Head
from .runs import Run, method_slug
from .stages import e2_features, rid_predict
from .methods import parse_method, run_needs, scored_key, split_key
from .utils import resolve_device


def _to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0,1] -> PIL."""
    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


class Predictor:
    """A finished run's E1 features, RID, E2 models and detectors, ready to score new images (no captions).

    `detectors` is keyed by scored key: `cmg` (Mahalanobis), `cmg@knn` (k-NN on the same features); `e2` by
    method (None for `raw`, the frozen trunk's features)."""

    def __init__(self, run: Run, cfg, rid: RID, e2: dict, detectors: dict, device: torch.device,
                 trunk=None, e1_image=None, apply: str = "pixel"):
        self.run, self.cfg, self.rid, self.e2, self.detectors = run, cfg, rid, e2, detectors
        self.device, self.trunk, self.e1_image, self.apply = device, trunk, e1_image, apply
        self.image_size, self.n_regions = cfg.data.image_size, cfg.cmer.n_regions
        self.mask, self.soft_value = cfg.cmer.mask, cfg.cmer.soft_value
        self.specs = {m: parse_method(m, cfg.cmle.loss) for m in e2}

    @property
    def methods(self) -> list[str]:
        """Scored keys: `cmg`, `cmg@knn`, ..."""
        return list(self.detectors)

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu") -> "Predictor":
        run = Run.open(run_dir)
        if run.status != "done":
            raise DataError(f"run {run.path} is not finished (status: {run.status}); wait for it or pick another run")
        cfg = run.config()
        try:
            return cls._build(run, cfg, resolve_device(device))
        except CMGError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:  # a received or damaged run
            raise DataError(f"run {run.path}: its models do not fit its config.yaml or are damaged "
                            f"({type(exc).__name__}: {str(exc)[:300]})") from exc

    @classmethod
    def _build(cls, run: Run, cfg, dev: torch.device) -> "Predictor":
        from .train.frozen import build_trunk
        from .train.nets import E1Image, backbone_for, build_e2

        models = run.path / "models"
        trunk = e1_image = None
        if cfg.e1.encoder == "frozen":
            trunk = build_trunk(cfg, dev)
            feature_dim = trunk.feature_dim
        else:
            backbone, spec = backbone_for(cfg)
            e1_image = E1Image(backbone, spec, cfg.model.head_hidden, cfg.model.embed_dim)
            state = load_model(model_path(models, "e1"))[0]
            e1_image.load_state_dict({k[len("image."):]: v.float() for k, v in state.items() if k.startswith("image.")})
            e1_image = e1_image.to(dev).eval()
            feature_dim = spec.feature_dim
        rid = None  # a run whose methods need no RID (raw, ssd, she, ...) has none: its images are not masked
        if "rid" in run_needs([parse_method(m, cfg.cmle.loss) for m in run.methods]):
            rid = RID(feature_dim, tuple(cfg.cmer.rid_hidden), dropout=cfg.cmer.rid_dropout)
            rid.load_state_dict({k: v.float() for k, v in load_model(model_path(models, "rid"))[0].items()})
            rid.eval()
        e2, dets = {}, {}
        for method in run.methods:
            weights, states, meta = load_model(model_path(models, method_slug(method)))
            e2[method] = None  # raw: the trunk's features, no network
            if parse_method(method).base == "bliss" and cfg.bliss.clip_model:  # CLIP embeds the images
                from .encoders.clip import clip_encoder

                e2[method] = clip_encoder(cfg.bliss, str(dev))
            elif parse_method(method).base == "bliss":  # the map of trunk features into the text model's space
                lin = torch.nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
                lin.load_state_dict({k: v.float() for k, v in weights.items()})
                e2[method] = lin.to(dev).eval()
            elif parse_method(method, cfg.cmle.loss).trained:
                text_dim = meta.get("text_dim") or None
                if cfg.model.profile == "frozen":
                    net = E2Head(meta.get("in_dim") or feature_dim, cfg.model.head_hidden, cfg.model.embed_dim,
                                 text_dim)
                else:
                    net = build_e2(cfg, text_dim)
                net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
                e2[method] = net.to(dev).eval()
            for scorer, state in states.items():
                dets[scored_key(method, scorer)] = detector_from_state(scorer, state)
        apply = run.info.get("mask_apply", "pixel")  # as recorded; older runs: pixel
        pred = cls(run, cfg, rid, e2, dets, dev, trunk=trunk, e1_image=e1_image, apply=apply)
        if trunk is not None and (run.path / "language.npz").is_file():
            from .language import LanguageExplainer

            pred.language = LanguageExplainer.load(run.path / "language.npz")
        return pred

    language = None  # the run's LanguageExplainer (cmg_core.language), when it has one

    def _trunk_size(self, x: torch.Tensor) -> int:
        """The frozen trunk's input size for (B, 3, S, S) images: the run's model.trunk_image_size, else S."""
        return self.cfg.model.trunk_image_size or x.shape[-1]

    def _rid_inputs(self, x: torch.Tensor, variants: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) images and (B, M, 3, S, S) variants -> RID inputs (orig (B, F), masked (B, M, F)),
        computed as the run computed its training features."""
        if self.trunk is not None:
            size = self._trunk_size(x)
            masks = grid_masks(size, size, self.n_regions, self.mask, self.soft_value)
            return self.trunk.masked_features(to_trunk_size(x, size), masks, self.apply)
        b, m = variants.shape[:2]
        feats = self.e1_image.features(torch.cat([x, variants.flatten(0, 1)]).to(self.device)).float().cpu()
        return feats[:b], feats[b:].view(b, m, -1)

    def _detector_features(self, method: str, x, variants, choice: np.ndarray, orig, masked) -> np.ndarray:
        if self.specs[method].base == "bliss" and hasattr(self.e2[method], "encode_images"):  # CLIP
            return self.e2[method].encode_images(x)
        if self.specs[method].base == "bliss":
            return self.e2[method](orig.float().to(self.device)).cpu().numpy()
        if not self.specs[method].trained:
            return orig.float().cpu().numpy()
        er = self.specs[method].er
        rows = torch.arange(len(x))
        if self.cfg.model.profile == "frozen":
            return e2_features(self.e2[method], masked[rows, torch.from_numpy(choice)] if er else orig)
        inp = variants[rows, torch.from_numpy(choice)] if er else x
        h, z = self.e2[method](inp.to(self.device))
        return (z if self.cfg.detector.features == "projection" else h).float().cpu().numpy()

    def _unmasked_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, F) features of the unmasked images (a run without RID: one trunk pass)."""
        if self.trunk is not None:
            return self.trunk(to_trunk_size(x, self._trunk_size(x)))
        return self.e1_image.features(x.to(self.device)).float().cpu()

    @torch.no_grad()
    def _score(self, pils: list, methods: list[str] | None = None):
        """RGB PIL images -> (x (B, 3, S, S), variants (B, M, 3, S, S), RID probabilities (B, M), choice (B,),
        {method: scores (B,)}, RID's input features of the unmasked images (B, F)). A run without RID gives no
        variants (B, 0, ...), probabilities or choice (None)."""
        x = to_float(images_to_tensor(pils, self.image_size))  # (B, 3, S, S)
        if self.rid is None:
            variants, masked, probs, choice = x[:, :0], None, None, None
            orig = self._unmasked_features(x)
        else:
            variants = masked_variants(x, self.n_regions, self.mask, self.soft_value)  # (B, M, 3, S, S)
            orig, masked = self._rid_inputs(x, variants)
            probs = rid_predict(self.rid, masked, orig).numpy()
            choice = probs.argmax(1)
        keys = methods or self.methods
        feats = {m: self._detector_features(m, x, variants, choice, orig, masked)
                 for m in dict.fromkeys(split_key(k)[0] for k in keys)}  # once per method, for every scorer
        scores = {k: self.detectors[k].score(feats[split_key(k)[0]]) for k in keys}
        return x, variants, probs, choice, scores, orig

    def score_table(self, images: list, batch_size: int = 64, methods: list[str] | None = None,
                    progress=None) -> pd.DataFrame:
        """Paths (or PIL images) -> one row per image: image, rid_choice, score_<m>, anomalous_<m> (1 above the
        calibrated threshold), error (why an unreadable image has no score). Images are decoded `batch_size` at a
        time, so memory does not grow with their number; `progress(done, total)` after each batch."""
        methods = methods or self.methods
        unknown = [m for m in methods if m not in self.detectors]
        if unknown:
            raise DataError(f"run {self.run.path} has no method(s) {unknown}; it has {self.methods}")
        columns = ["image", "rid_choice", *[f"{k}_{m}" for m in methods for k in ("score", "anomalous")], "error"]
        out = []
        for s in range(0, len(images), batch_size):
            chunk = images[s : s + batch_size]
            rows = [{"image": str(src) if isinstance(src, (str, Path)) else getattr(src, "filename", ""),
                     "error": ""} for src in chunk]
            pils, ok = [], []
            for i, src in enumerate(chunk):
                try:
                    pils.append(src if isinstance(src, Image.Image) else open_image(src))
                    ok.append(i)
                except (DataError, OSError) as exc:  # one unreadable file must not stop the batch
                    rows[i]["error"] = str(exc)
            if pils:
                _, _, _, choice, scores, _ = self._score(pils, methods)
                for j, i in enumerate(ok):
                    rows[i]["rid_choice"] = int(choice[j]) if choice is not None else None
                    for m in methods:
                        rows[i][f"score_{m}"] = float(scores[m][j])
                        rows[i][f"anomalous_{m}"] = int(scores[m][j] > self.detectors[m].threshold_)
            out += rows
            del pils
            if progress is not None:
                progress(min(s + batch_size, len(images)), len(images))
        table = pd.DataFrame(out, columns=columns)
        ints = ["rid_choice", *[f"anomalous_{m}" for m in methods]]
        table[ints] = table[ints].astype("Int64")  # an unreadable image leaves them empty, not 1.0
        return table

    @torch.no_grad()
    def explain_many(self, images: list) -> list[dict]:
        """PIL images, paths or file objects -> one result dict per image (see `explain`)."""
        pils = [img if isinstance(img, Image.Image) else open_image(img) for img in images]
        x, variants, probs, choice, scores, orig = self._score(pils)
        per_method = {m: (s, self.detectors[m].percentile(s), self.detectors[m].threshold_)
                      for m, s in scores.items()}
        words = [None] * len(pils)
        if self.language is not None:  # in words: nearest normal captions, dictionary words, caption cluster
            words = self.language.explain(orig.float().cpu().numpy())
        return [{
            "variants": [_to_pil(v) for v in variants[i]],
            "rid_probs": probs[i] if probs is not None else None,  # None: the run has no RID (no masks)
            "rid_choice": int(choice[i]) if choice is not None else None,
            "masked_image": _to_pil(variants[i, choice[i]]) if choice is not None else None,
            "image": _to_pil(x[i]),
            "scores": {k: float(v[0][i]) for k, v in per_method.items()},
            "percentiles": {k: float(v[1][i]) for k, v in per_method.items()},
            "thresholds": {k: v[2] for k, v in per_method.items()},
            "anomalous": {k: bool(v[0][i] > v[2]) for k, v in per_method.items()},
            "threshold_meaning": {k: self.detectors[k].describe_threshold() for k in per_method},
            "language": words[i],
        } for i in range(len(pils))]

    def explain(self, image) -> dict:
        """One image -> variants, rid_probs, rid_choice, masked_image, image, scores, percentiles (among the normal
        training images' out-of-fold scores), thresholds (each detector's calibrated `threshold_`), anomalous."""
        return self.explain_many([image])[0]

    def score(self, images: list, method: str = "cmg", batch_size: int = 64) -> np.ndarray:
        """(N,) anomaly scores of `method` (higher = more anomalous); an unreadable image raises DataError."""
        if method not in self.detectors:
            raise DataError(f"run {self.run.path} has no method {method!r}; it has {self.methods}")
        out = []
        for s in range(0, len(images), batch_size):
            pils = [img if isinstance(img, Image.Image) else open_image(img) for img in images[s : s + batch_size]]
            out.append(self._score(pils, [method])[4][method])
        return np.concatenate(out) if out else np.zeros(0)
