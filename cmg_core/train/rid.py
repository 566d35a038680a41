"""RID's stage of a run (rank 0): train (or load) RID on the training images' masked variants, its probabilities
for every row, cmer.csv, and - when the run's scorings ask for it - the choice of RID's epoch selected on the normal
test images (`protocol.rid_select: test`, a departure)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..artifacts import load_model, model_path
from ..models import RID
from ..runs import write_csv
from ..stages import rid_predict, rid_validation, train_rid, train_rid_selected_on
from .context import StageContext


def rid_stage(ctx: StageContext, e1_scores: np.ndarray, orig: torch.Tensor, masked: torch.Tensor,
              cmer_label: np.ndarray, roles: np.ndarray, is_anomaly: np.ndarray, test_select: bool = False
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """(RID's probabilities (R, M), the test-selected RID's choice (R,) or None) of every row; writes cmer.csv.
    e1_scores (R, M): Eq.2 of each masked variant; orig (R, F), masked (R, M, F): RID's inputs; cmer_label (R,):
    CMER's choice; roles / is_anomaly (R,): train/test, 0/1; test_select: also RID selected on the test set."""
    cfg, n, io = ctx.cfg, ctx.n_train, ctx.io

    def train():
        state, save = io.checkpoint("rid", "rid")
        return train_rid(masked[:n], orig[:n], torch.from_numpy(cmer_label[:n]).long(),
                         rid_validation(n, cfg.cmer, ctx.stage_seed(2)), cfg.cmer, ctx.stage_seed(2),
                         on_epoch=io.epoch_cb(cfg.cmer.rid_epochs, "RID"), state=state, on_checkpoint=save)
    rid = _load_or_train(ctx, "rid", masked.shape[-1], train)
    probs = rid_predict(rid, masked, orig).numpy()
    m = cfg.cmer.n_regions
    cols = {f"e1_score_{j}": e1_scores[:, j] for j in range(m)}
    cols.update({f"rid_prob_{j}": probs[:, j] for j in range(m)})
    choice = probs.argmax(1)
    test_choice = rid_test_choice(ctx, masked, orig, cmer_label, is_anomaly) if test_select else None
    extra = {"rid_test_choice": test_choice} if test_choice is not None else {}
    write_csv(io.run_dir / "cmer.csv", pd.DataFrame({
        "row": np.arange(len(ctx.rows)), "role": roles, **cols, "cmer_label": cmer_label,
        "rid_choice": choice, "agree": (cmer_label == choice).astype(int), **extra}))
    return probs, test_choice


def rid_test_choice(ctx: StageContext, masked: torch.Tensor, orig: torch.Tensor, cmer_label: np.ndarray,
                    is_anomaly: np.ndarray) -> np.ndarray:
    """(R,) the choice of RID's epoch most accurate on the normal test images against their CMER labels (own
    captions): the released code's checkpoint selection. Retrained from scratch with the honest RID's seed;
    models/rid_test.npz."""
    cfg, n = ctx.cfg, ctx.n_train
    normal_test = np.flatnonzero((is_anomaly == 0) & (np.arange(len(ctx.rows)) >= n))
    rid = _load_or_train(ctx, "rid_test", masked.shape[-1], lambda: train_rid_selected_on(
        masked, orig, torch.from_numpy(cmer_label).long(), n, normal_test, cfg.cmer, ctx.stage_seed(2),
        rid_validation(n, cfg.cmer, ctx.stage_seed(2))))
    return rid_predict(rid, masked, orig).numpy().argmax(1)


def _load_or_train(ctx: StageContext, name: str, feature_dim: int, train) -> RID:
    """models/<name>.npz when the run has it (a resumed run), else `train()`'s RID, saved there."""
    cfg, path = ctx.cfg, model_path(ctx.io.models, name)
    if not path.is_file():
        rid = train()
        ctx.io.save_model(path, rid.state_dict())
        ctx.io.drop_checkpoint(name)  # superseded by the final model
        return rid
    rid = RID(feature_dim, tuple(cfg.cmer.rid_hidden), dropout=cfg.cmer.rid_dropout)
    rid.load_state_dict(load_model(path)[0])
    return rid
