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
    path = model_path(run.models, "rid")
    rid = RID(masked.shape[-1], tuple(cfg.cmer.rid_hidden), dropout=cfg.cmer.rid_dropout)
    if path.is_file():
        rid.load_state_dict(load_model(path)[0])
    else:
        val = rid_validation(n, cfg.cmer, run.stage_seed(2))
        state, save = run.checkpoint("rid", "rid")
        rid = train_rid(masked[:n], orig[:n], torch.from_numpy(run.cmer_label[:n]).long(), val,
                        cfg.cmer, run.stage_seed(2), on_epoch=run.epoch_cb(cfg.cmer.rid_epochs, "RID"),
                        state=state, on_checkpoint=save)
        run.save_model(path, rid.state_dict())
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
    path = model_path(run.models, "rid_test")
    rid = RID(masked.shape[-1], tuple(cfg.cmer.rid_hidden), dropout=cfg.cmer.rid_dropout)
    if path.is_file():
        rid.load_state_dict(load_model(path)[0])
    else:
        normal_test = np.flatnonzero((run.is_anomaly == 0) & (np.arange(len(run.rows)) >= n))
        rid = train_rid_selected_on(masked, orig, torch.from_numpy(run.cmer_label).long(), n, normal_test,
                                    cfg.cmer, run.stage_seed(2), rid_validation(n, cfg.cmer, run.stage_seed(2)))
        run.save_model(path, rid.state_dict())
    return rid_predict(rid, masked, orig).numpy().argmax(1)
