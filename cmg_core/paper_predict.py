"""Scoring new images with a finished `paper`-profile run (see cmg_core.paper): `PaperPredictor`."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import RunConfig
from .detector import MahalanobisDetector
from .errors import DataError

from .models import RID
from .paper_models import E1Image, _backbone, build_e2
from .pipeline import USES_ER
from .predict import BasePredictor, _to_pil  # noqa: F401  (_to_pil re-exported by cmg_core.paper)
from .runs import Run, method_slug
from .utils import resolve_device


class PaperPredictor(BasePredictor):
    """A finished paper-profile run's E1 backbone + RID, E2 encoders and detectors, ready to score images.

    Same interface as predict.Predictor (`methods`, `explain_many`, `explain`, `score`, from BasePredictor).
    """

    def __init__(self, run: Run, e1_image: E1Image, rid: RID, encoders: dict, detectors: dict, cfg: RunConfig,
                 device: torch.device):
        self.run, self.e1_image, self.rid, self.encoders, self.detectors = run, e1_image, rid, encoders, detectors
        self.cfg, self.device = cfg, device
        self.image_size, self.n_regions = cfg.data.image_size, cfg.cmer.n_regions
        self.mask, self.soft_value = cfg.cmer.mask, cfg.cmer.soft_value


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

    def _rid_inputs(self, x, variants):
        b, m = variants.shape[:2]
        feats = self.e1_image.features(torch.cat([x, variants.flatten(0, 1)]).to(self.device)).float().cpu()
        return feats[:b], feats[b:].view(b, m, -1)

    def _detector_features(self, method, x, variants, choice, orig, masked):
        inp = variants[torch.arange(len(x)), torch.from_numpy(choice)] if USES_ER[method] else x
        h, z = self.encoders[method](inp.to(self.device))
        return (z if self.cfg.detector.features == "projection" else h).float().cpu().numpy()
