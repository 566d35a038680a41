"""Why caption guidance does not help in the from-scratch regime: per task, RID's accuracy and its agreement with
CMER, AUROC within groups of test images that RID masks in the same quadrant (ssd vs ssd+er), and the effective
rank of the normal training features (ssd, ssd+le[lle], ssd+le[supcon]).

    .venv/bin/python bench/scratch_diagnostics.py experiments/ucm_captions_scratch_dev/task_seed10*

Reads run folders only (no training). The README's "Why" bullets for the end2end profile come from it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmg_core.runs import Run  # noqa: E402


def effective_rank(x: np.ndarray) -> float:
    """exp(entropy of the normalised squared singular values) of the centred rows of x (N, D)."""
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    p = s ** 2 / np.sum(s ** 2)
    return float(np.exp(-(p * np.log(p + 1e-12)).sum()))


def task_report(run: Run) -> list[str]:
    scores, cmer, images = run.scores(), run.cmer(), run.images()
    test = (images.role == "test").to_numpy()
    train = ~test
    y = images.is_anomaly.to_numpy()[test]
    rid = run.history().query("stage == 'rid'")
    out = [f"{run.name}: RID val acc {rid.val_acc.iloc[-1]:.2f}, train acc {rid.train_acc.iloc[-1]:.2f}, chance "
           f"{rid.chance.iloc[-1]:.2f}; RID = CMER on {100 * cmer.agree.to_numpy()[test].mean():.0f} % of test images"]
    choice = cmer.rid_choice.to_numpy()[test]
    for m in ("ssd", "ssd+er"):
        if f"score_{m}" not in scores:
            continue
        s = scores[f"score_{m}"].to_numpy()[test]
        within = [100 * roc_auc_score(y[choice == c], s[choice == c]) for c in np.unique(choice)
                  if len(set(y[choice == c])) == 2]
        out.append(f"  {m}: AUROC {100 * roc_auc_score(y, s):.1f}; within each RID-mask group "
                   f"{', '.join(f'{a:.1f}' for a in within)}")
    for m in ("ssd", "ssd+le[lle]", "ssd+le[supcon]"):
        if m in run.methods:
            out.append(f"  effective rank of the normal training features, {m}: "
                       f"{effective_rank(run.embeddings(m)[train]):.1f}")
    return out


def main(argv=None) -> int:
    for p in (argv if argv is not None else sys.argv[1:]):
        run = Run.open(p)
        print("\n".join(task_report(run)) if run.status == "done" else f"{run.name}: not finished, left out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
