"""Scoring new images with a finished `paper`-profile run (see cmg_core.paper): `PaperPredictor`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import RunConfig
from .data.images import open_image
from .detector import MahalanobisDetector
from .errors import DataError
from .features import images_to_tensor, masked_variants, to_float
from .models import RID
from .paper_models import E1Image, _backbone, build_e2
from .pipeline import USES_ER
from .runs import Run, method_slug
from .stages import rid_predict
from .utils import resolve_device


def _to_pil(x: torch.Tensor):
    from PIL import Image

    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


class PaperPredictor:
    """A finished paper-profile run's E1 backbone + RID, E2 encoders and detectors, ready to score images.

    Same interface as predict.Predictor: `methods`, `explain_many`, `explain`, `score`.
    """

    def __init__(self, run: Run, e1_image: E1Image, rid: RID, encoders: dict, detectors: dict, cfg: RunConfig,
                 device: torch.device):
        self.run, self.e1_image, self.rid, self.encoders, self.detectors = run, e1_image, rid, encoders, detectors
        self.cfg, self.device = cfg, device
        self.image_size, self.n_regions = cfg.data.image_size, cfg.cmer.n_regions
        self.mask, self.soft_value = cfg.cmer.mask, cfg.cmer.soft_value

    @property
    def methods(self) -> list[str]:
        return list(self.encoders)

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu") -> "PaperPredictor":
        run = Run.open(run_dir)
        if run.status != "done":
            raise DataError(f"run {run.path} is not finished (status: {run.status}); wait for it or pick another run")
        cfg = run.config()
        dev = resolve_device(device)
        models = run.path / "models"
        state = torch.load(models / "rid.pt", map_location="cpu", weights_only=False)
        backbone, spec = _backbone(cfg)
        e1_image = E1Image(backbone, spec, cfg.model.head_hidden, cfg.model.embed_dim)
        missing, unexpected = e1_image.load_state_dict({k: v.float() for k, v in state["e1_image"].items()},
                                                       strict=False)
        if unexpected or any(not k.startswith("head.") for k in missing):
            raise DataError(f"{models / 'rid.pt'} does not match the run's E1 backbone "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        rid = RID(int(state["feature_dim"]), tuple(cfg.cmer.rid_hidden), dropout=cfg.cmer.rid_dropout)
        rid.load_state_dict({k: v.float() for k, v in state["rid"].items()})
        encs, dets = {}, {}
        for method in run.methods:
            st = torch.load(models / f"{method_slug(method)}.pt", map_location="cpu", weights_only=False)
            enc = build_e2(cfg, st.get("text_dim"))
            enc.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in st["model"].items()})
            encs[method] = enc.to(dev).eval()
            dets[method] = MahalanobisDetector.from_state_dict(st["detector"])
        return cls(run, e1_image.to(dev).eval(), rid.eval(), encs, dets, cfg, dev)

    @torch.no_grad()
    def explain_many(self, images: list) -> list[dict]:
        """PIL images, paths or file objects -> one result dict per image (see predict.Predictor.explain)."""
        from PIL import Image

        pils = [img if isinstance(img, Image.Image) else open_image(img) for img in images]
        x = to_float(images_to_tensor(pils, self.image_size))  # (B, 3, S, S)
        variants = masked_variants(x, self.n_regions, self.mask, self.soft_value)  # (B, M, 3, S, S)
        b, m = variants.shape[:2]
        feats = self.e1_image.features(torch.cat([x, variants.flatten(0, 1)]).to(self.device)).float().cpu()
        orig, masked = feats[:b], feats[b:].view(b, m, -1)
        probs = rid_predict(self.rid, masked, orig).numpy()
        choice = probs.argmax(1)
        per_method = {}
        for method, enc in self.encoders.items():
            inp = variants[torch.arange(b), torch.from_numpy(choice)] if USES_ER[method] else x
            h, z = enc(inp.to(self.device))
            f = (z if self.cfg.detector.features == "projection" else h).float().cpu().numpy()
            det = self.detectors[method]
            s = det.score(f)
            per_method[method] = (s, det.percentile(s), float(np.percentile(det.train_scores_, 95)))
        out = []
        for i in range(b):
            out.append({
                "variants": [_to_pil(v) for v in variants[i]],
                "rid_probs": probs[i],
                "rid_choice": int(choice[i]),
                "masked_image": _to_pil(variants[i, choice[i]]),
                "image": _to_pil(x[i]),
                "scores": {k: float(v[0][i]) for k, v in per_method.items()},
                "percentiles": {k: float(v[1][i]) for k, v in per_method.items()},
                "thresholds": {k: v[2] for k, v in per_method.items()},
            })
        return out

    def explain(self, image) -> dict:
        return self.explain_many([image])[0]

    def score(self, images: list, method: str = "cmg") -> np.ndarray:
        if method not in self.encoders:
            raise DataError(f"run {self.run.path} has no method {method!r}; it has {self.methods}")
        return np.array([r["scores"][method] for r in self.explain_many(images)])
