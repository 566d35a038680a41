"""Score new images with a finished run: RID picks the mask (no captions), E2 + detector give the score.

    pred = Predictor.load("runs/my_run")
    res = pred.explain(pil_image)   # variants, rid_probs, rid_choice, masked_image, scores, percentiles, thresholds
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.images import open_image
from .detector import MahalanobisDetector
from .errors import DataError
from .features import Trunk, images_to_tensor, masked_variants, to_float
from .masks import grid_masks
from .models import RID, E2Head
from .pipeline import USES_ER
from .runs import Run, method_slug
from .stages import e2_features, rid_predict
from .utils import resolve_device


def _to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0,1] -> PIL."""
    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


class BasePredictor:
    """The explain flow shared by both profiles: masked variants -> RID's choice (no captions) -> each
    method's detector features -> scores. Subclasses say how RID inputs and detector features are computed.

    Attributes every subclass sets: run, rid, detectors {method: MahalanobisDetector}, image_size, n_regions,
    mask, soft_value.
    """

    @property
    def methods(self) -> list[str]:
        return list(self.detectors)

    def _rid_inputs(self, x: torch.Tensor, variants: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) images and (B, M, 3, S, S) variants -> RID inputs (orig (B, F), masked (B, M, F))."""
        raise NotImplementedError

    def _detector_features(self, method: str, x: torch.Tensor, variants: torch.Tensor, choice: np.ndarray,
                           orig: torch.Tensor, masked: torch.Tensor) -> np.ndarray:
        """(B, D) features the method's detector scores."""
        raise NotImplementedError

    @torch.no_grad()
    def explain_many(self, images: list) -> list[dict]:
        """PIL images, paths or file objects -> one result dict per image (see `explain`)."""
        pils = [img if isinstance(img, Image.Image) else open_image(img) for img in images]
        x = to_float(images_to_tensor(pils, self.image_size))  # (B, 3, S, S)
        variants = masked_variants(x, self.n_regions, self.mask, self.soft_value)  # (B, M, 3, S, S)
        orig, masked = self._rid_inputs(x, variants)
        probs = rid_predict(self.rid, masked, orig).numpy()
        choice = probs.argmax(1)
        per_method = {}
        for method, det in self.detectors.items():
            s = det.score(self._detector_features(method, x, variants, choice, orig, masked))
            per_method[method] = (s, det.percentile(s), float(np.percentile(det.train_scores_, 95)))
        return [{
            "variants": [_to_pil(v) for v in variants[i]],
            "rid_probs": probs[i],
            "rid_choice": int(choice[i]),
            "masked_image": _to_pil(variants[i, choice[i]]),
            "image": _to_pil(x[i]),
            "scores": {k: float(v[0][i]) for k, v in per_method.items()},
            "percentiles": {k: float(v[1][i]) for k, v in per_method.items()},
            "thresholds": {k: v[2] for k, v in per_method.items()},
        } for i in range(len(pils))]

    def explain(self, image) -> dict:
        """One image -> variants, rid_probs, rid_choice, masked_image, image, scores, percentiles, thresholds."""
        return self.explain_many([image])[0]

    def score(self, images: list, method: str = "cmg") -> np.ndarray:
        """(N,) anomaly scores of `method` (higher = more anomalous)."""
        if method not in self.detectors:
            raise DataError(f"run {self.run.path} has no method {method!r}; it has {self.methods}")
        return np.array([r["scores"][method] for r in self.explain_many(images)])


class Predictor(BasePredictor):
    """A finished run's RID, E2 heads and detectors (cpu profile), ready to score images."""

    def __init__(self, run: Run, trunk: Trunk, rid: RID, heads: dict[str, E2Head],
                 detectors: dict[str, MahalanobisDetector], image_size: int, n_regions: int, mask: str,
                 soft_value: float, apply: str = "pixel"):
        self.run, self.trunk, self.rid, self.heads, self.detectors = run, trunk, rid, heads, detectors
        self.image_size, self.n_regions, self.mask, self.soft_value = image_size, n_regions, mask, soft_value
        self.apply = apply

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu") -> "Predictor":
        run = Run.open(run_dir)
        if run.status != "done":
            raise DataError(f"run {run.path} is not finished (status: {run.status}); wait for it or pick another run")
        cfg = run.config()
        if cfg.model.profile != "cpu":
            from .paper import PaperPredictor  # end-to-end models need their own loader

            return PaperPredictor.load(run_dir, device=device)
        dev = resolve_device(device)
        trunk = Trunk.build(cfg.model.backbone, cfg.model.pretrained, dev, precision=cfg.model.trunk_precision,
                            weights=cfg.model.backbone_weights, cifar_stem=cfg.model.cifar_stem)
        models = run.path / "models"
        rid = RID(trunk.feature_dim, tuple(cfg.cmer.rid_hidden), dropout=cfg.cmer.rid_dropout)
        rid.load_state_dict(torch.load(models / "rid.pt", weights_only=True))
        heads, dets = {}, {}
        for method in run.methods:
            state = torch.load(models / f"{method_slug(method)}.pt", weights_only=False)
            head = E2Head(state["in_dim"], cfg.model.head_hidden, cfg.model.embed_dim, state.get("text_dim"))
            head.load_state_dict(state["model"])
            heads[method] = head.eval()
            dets[method] = MahalanobisDetector.from_state_dict(state["detector"])
        return cls(run, trunk, rid.eval(), heads, dets, cfg.data.image_size, cfg.cmer.n_regions, cfg.cmer.mask,
                   cfg.cmer.soft_value, run.info.get("mask_apply", "pixel"))  # as recorded; older runs: pixel

    def _rid_inputs(self, x, variants):
        masks = grid_masks(x.shape[-2], x.shape[-1], self.n_regions, self.mask, self.soft_value)
        return self.trunk.masked_features(x, masks, self.apply)  # as the run's training features were made

    def _detector_features(self, method, x, variants, choice, orig, masked):
        f = masked[torch.arange(len(x)), torch.from_numpy(choice)] if USES_ER[method] else orig
        return e2_features(self.heads[method], f)
