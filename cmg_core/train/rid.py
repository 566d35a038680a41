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


def rid_stage(run) -> tuple[np.ndarray, np.ndarray | None]:
    """(RID's probabilities (R, M), the test-selected RID's choice (R,) or None) of every row; writes cmer.csv."""
    cfg, n = run.cfg, run.n_train
    masked, orig = run.rid_masked, run.rid_orig

    def train():
        state, save = run.checkpoint("rid", "rid")
        return train_rid(masked[:n], orig[:n], torch.from_numpy(run.cmer_label[:n]).long(),
                         rid_validation(n, cfg.cmer, run.stage_seed(2)), cfg.cmer, run.stage_seed(2),
                         on_epoch=run.epoch_cb(cfg.cmer.rid_epochs, "RID"), state=state, on_checkpoint=save)
    rid = _load_or_train(run, "rid", masked.shape[-1], train)
    probs = rid_predict(rid, masked, orig).numpy()
    m = cfg.cmer.n_regions
    cols = {f"e1_score_{j}": run.e1_scores[:, j] for j in range(m)}
    cols.update({f"rid_prob_{j}": probs[:, j] for j in range(m)})
    choice = probs.argmax(1)
    needs_test = any(s.uses_rid_test for s in (run.scoring, *run.extra_scorings))
    test_choice = rid_test_choice(run, masked, orig) if needs_test else None
    extra = {"rid_test_choice": test_choice} if test_choice is not None else {}
    write_csv(run.run_dir / "cmer.csv", pd.DataFrame({
        "row": np.arange(len(run.rows)), "role": run.roles, **cols, "cmer_label": run.cmer_label,
        "rid_choice": choice, "agree": (run.cmer_label == choice).astype(int), **extra}))
    return probs, test_choice


def rid_test_choice(run, masked: torch.Tensor, orig: torch.Tensor) -> np.ndarray:
    """(R,) the choice of RID's epoch most accurate on the normal test images against their CMER labels (own
    captions): the released code's checkpoint selection. Retrained from scratch with the honest RID's seed;
    models/rid_test.npz."""
    cfg, n = run.cfg, run.n_train
    normal_test = np.flatnonzero((run.is_anomaly == 0) & (np.arange(len(run.rows)) >= n))
    rid = _load_or_train(run, "rid_test", masked.shape[-1], lambda: train_rid_selected_on(
        masked, orig, torch.from_numpy(run.cmer_label).long(), n, normal_test, cfg.cmer, run.stage_seed(2),
        rid_validation(n, cfg.cmer, run.stage_seed(2))))
    return rid_predict(rid, masked, orig).numpy().argmax(1)


def _load_or_train(run, name: str, feature_dim: int, train) -> RID:
    """models/<name>.npz when the run has it (a resumed run), else `train()`'s RID, saved there."""
    cfg, path = run.cfg, model_path(run.models, name)
    if not path.is_file():
        rid = train()
        run.save_model(path, rid.state_dict())
        run.drop_checkpoint(name)  # superseded by the final model
        return rid
    rid = RID(feature_dim, tuple(cfg.cmer.rid_hidden), dropout=cfg.cmer.rid_dropout)
    rid.load_state_dict(load_model(path)[0])
    return rid
