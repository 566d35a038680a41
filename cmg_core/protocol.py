"""The honest protocol and the authors' released code's departures from it (the `protocol` config section).

Honest (the default everywhere): ER methods score every image masked by RID's choice (a test image's captions
are never read), features are extracted with BatchNorm in eval mode, the reported AUROC is the final epoch's,
RID is its last epoch. The departures, each a switch (cmg_core.config.ProtocolConfig):

* scoring only, no retraining: `test_masks: captions` (every image masked by CMER's argmax with its own captions,
  as the released pre-processed files hold them), `anomaly_masks` (a diagnostic: anomalies masked by another
  rule than the normal images), `rid_select: test` (RID's epoch most accurate on the normal test images),
  `bn_mode: train` (BatchNorm in train mode over class-pure batches: training images, normal test images and
  anomalies never share a batch), `report_epoch: best` (the maximum over epochs of the test AUROC);
* training: `supcon_labels: batch` (SupCon's caption clusters from a GMM refitted on every mini-batch),
  `method_epochs` (per-method E2 epochs: the released SSD trains 200, CMG 80), `train_items: captions` (an
  epoch passes each image once per caption, as the released loaders' one item per caption).

A `Scoring` is how one set of features is extracted for the detectors; the run's own comes from its protocol
section, and `cmg audit` asks a run for several at every evaluated epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MASK_RULES = ("rid", "rid_test", "captions")


@dataclass(frozen=True)
class Scoring:
    """How features are extracted for scoring: the mask rule of the rows (`rid`, `rid_test`, `captions`), of the
    anomalies (`same`, or `none` / a mask rule: the asymmetry diagnostic) and the BatchNorm mode (`eval`,
    `train` over class-pure batches)."""
    masks: str = "rid"
    anomaly_masks: str = "same"
    bn: str = "eval"

    @property
    def key(self) -> str:
        """'' for the honest scoring, else e.g. 'masks=captions,bn=train' (history keys `auroc|<key>`)."""
        parts = [f"masks={self.masks}"] if self.masks != "rid" else []
        parts += [f"anomalies={self.anomaly_masks}"] if self.anomaly_masks != "same" else []
        parts += [f"bn={self.bn}"] if self.bn != "eval" else []
        return ",".join(parts)

    @property
    def uses_rid_test(self) -> bool:
        return "rid_test" in (self.masks, self.anomaly_masks)


def scoring_needs(scorings) -> set[str]:
    """Stages (cmg_core.methods.NEEDS) that scorings masking anomalies of every method need: `captions` -> E1
    and CMER's labels, `rid` / `rid_test` -> RID too."""
    rules = {s.anomaly_masks for s in scorings} & set(MASK_RULES)
    return ({"captions", "e1"} if rules else set()) | ({"rid"} if rules - {"captions"} else set())


def run_scoring(protocol) -> Scoring:
    """The Scoring of a run's protocol section (cmg_core.config.ProtocolConfig)."""
    rid = "rid_test" if protocol.rid_select == "test" else "rid"
    masks = "captions" if protocol.test_masks == "captions" else rid
    anomaly = rid if protocol.anomaly_masks == "rid" else protocol.anomaly_masks
    return Scoring(masks, anomaly, "train" if protocol.bn_mode == "train" else "eval")


def scoring_masks(scoring: Scoring, er: bool, choices: dict, is_anomaly: np.ndarray) -> np.ndarray | None:
    """(R,) the mask index of each row under `scoring` (-1 = unmasked), None when no row is masked.

    er: whether the method masks its images at all; choices {rule: (R,) mask index} for the rules in
    MASK_RULES (`captions` = CMER's argmax with each image's own captions); is_anomaly (R,) 0/1."""
    r = len(is_anomaly)
    out = np.asarray(choices[scoring.masks], dtype=np.int64).copy() if er else np.full(r, -1, dtype=np.int64)
    if scoring.anomaly_masks != "same":
        alt = (np.full(r, -1, dtype=np.int64) if scoring.anomaly_masks == "none"
               else np.asarray(choices[scoring.anomaly_masks], dtype=np.int64))
        out = np.where(np.asarray(is_anomaly) == 1, alt, out)
    return None if (out < 0).all() else out


def class_pure_groups(n_train: int, is_anomaly: np.ndarray) -> np.ndarray:
    """(R,) batch group of each row for BatchNorm in train mode: 0 training images, 1 normal test images,
    2 anomalies (the released code's loaders never mix them in a batch)."""
    groups = np.where(np.asarray(is_anomaly) == 1, 2, 1)
    groups[:n_train] = 0
    return groups


def departures(protocol) -> list[str]:
    """The departures a protocol section turns on, in words for tables, run.json and the app ([] = honest)."""
    out = []
    if protocol.test_masks == "captions":
        out.append("uses test captions (test images masked by CMER with their own captions)")
    if protocol.anomaly_masks != "same":
        out.append(f"anomalies prepared differently from normal images (anomaly masks: {protocol.anomaly_masks})")
    if protocol.rid_select == "test":
        out.append("test-set model selection (RID's epoch chosen on the normal test images)")
    if protocol.report_epoch == "best":
        out.append("test-set model selection (reported AUROC = maximum over epochs of the test AUROC)")
    if protocol.bn_mode == "train":
        out.append("uses test labels (BatchNorm in train mode over class-pure test batches)")
    if protocol.supcon_labels == "batch":
        out.append("SupCon clusters refitted on every mini-batch (released code)")
    if protocol.method_epochs:
        out.append("per-method epochs " + ", ".join(f"{m}: {e}" for m, e in protocol.method_epochs.items()))
    if protocol.train_items == "captions":
        out.append("an epoch passes each image once per caption (released loaders)")
    return out


def evaluated_epoch(epoch: int, total: int, every: int) -> bool:
    """Whether the test AUROC is recorded after `epoch` (1-based) of `total`: every `every` epochs, the first and
    the last."""
    return epoch == 1 or epoch == total or epoch % max(int(every), 1) == 0


def auroc_key(scorer_key: str, scoring_key: str = "") -> str:
    """History key of a per-epoch test AUROC: 'auroc' (the method's own score, the run's scoring), 'auroc@knn',
    'auroc|masks=captions' (a scoring the audit asked for)."""
    base = "auroc" + scorer_key
    return f"{base}|{scoring_key}" if scoring_key else base
