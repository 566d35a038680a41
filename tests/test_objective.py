"""Method names with CMLE readings, the supervised contrastive loss and the E2 step loss (cmg_core.train.objective),
against hand-written references on tiny inputs."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cmg_core.config import load_config
from cmg_core.errors import ConfigError
from cmg_core.losses import lle_reconstruction_loss, nt_xent_loss, supcon_loss
from cmg_core.methods import method_label, parse_method
from cmg_core.train.objective import Guidance, e2_step_loss


def _supcon_reference(z1, z2, labels, t):
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    lab = np.concatenate([labels, labels])
    n = len(z)
    total = 0.0
    for a in range(n):
        others = [j for j in range(n) if j != a]
        denom = np.log(sum(np.exp(z[a] @ z[j] / t) for j in others))
        pos = [p for p in others if lab[p] == lab[a]]
        total += -np.mean([z[a] @ z[p] / t - denom for p in pos])
    return total / n


def test_supcon_matches_reference():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    labels = np.array([0, 1, 0, 2, 1, 0])
    got = supcon_loss(torch.tensor(z1), torch.tensor(z2), torch.tensor(labels), 0.5).item()
    assert got == pytest.approx(_supcon_reference(z1, z2, labels, 0.5), rel=1e-9)
    # base temperature scales the loss by T / T_base (the released code: 0.5 / 0.07)
    scaled = supcon_loss(torch.tensor(z1), torch.tensor(z2), torch.tensor(labels), 0.5, base_temperature=0.07).item()
    assert scaled == pytest.approx(got * 0.5 / 0.07, rel=1e-9)


def test_supcon_with_unique_labels_is_nt_xent():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    assert torch.allclose(supcon_loss(z1, z2, torch.arange(7), 0.5), nt_xent_loss(z1, z2, 0.5), atol=1e-6)


def test_parse_method_and_labels():
    assert parse_method("cmg").reading == "lle" and parse_method("cmg", "supcon").reading == "supcon"
    s = parse_method("ssd+le[supcon]")
    assert (s.base, s.er, s.le, s.mse, s.reading, s.label) == ("ssd+le", False, True, False, "supcon", "ssd+le[supcon]")
    assert parse_method("cmg-mse").reading is None and method_label("cmg-mse") == "cmg-mse"
    assert method_label("cmg", "supcon") == "cmg[supcon]"
    for bad in ("ssd[lle]", "cmg[pca]", "cmgx", "cmg["):
        with pytest.raises(ConfigError):
            parse_method(bad)


def test_raw_method_and_scored_keys():
    from cmg_core.methods import scored_key, split_key

    raw = parse_method("raw")
    assert not raw.trained and not (raw.er or raw.le or raw.mse) and raw.label == "raw"
    assert parse_method("cmg").trained
    with pytest.raises(ConfigError, match="CMLE reading"):
        parse_method("raw[lle]")
    assert scored_key("cmg") == "cmg" and scored_key("cmg", "knn") == "cmg@knn"
    assert split_key("cmg[supcon]@knn") == ("cmg[supcon]", "knn") and split_key("ssd+er") == ("ssd+er", "mahalanobis")


def test_config_validates_methods_and_cmle_loss():
    cfg = load_config(None, ["train.methods=[ssd, cmg[lle], cmg[supcon]]", "cmle.loss=supcon"])
    assert cfg.train.methods == ("ssd", "cmg[lle]", "cmg[supcon]")
    with pytest.raises(ConfigError, match="cmle.loss"):
        load_config(None, ["cmle.loss=pca"])
    with pytest.raises(ConfigError, match="twice"):
        load_config(None, ["train.methods=[cmg, cmg[lle]]"])  # the same method under two names
    with pytest.raises(ConfigError, match="unknown method"):
        load_config(None, ["train.methods=[ssd, knn]"])


def test_step_loss_parts():
    g0 = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(4, 3, generator=g0), torch.randn(4, 3, generator=g0)
    idx = torch.tensor([0, 2, 3, 5])
    plain, parts = e2_step_loss(Guidance(), idx, z1, z2, 0.5)
    assert torch.allclose(plain, nt_xent_loss(z1, z2, 0.5)) and parts["global"] == parts["mse"] == 0.0

    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    sup = Guidance(cluster_labels=labels, weight=2.0)
    loss, parts = e2_step_loss(sup, idx, z1, z2, 0.5)
    ref = supcon_loss(z1, z2, labels[idx], 0.5)
    assert torch.allclose(loss, ref) and parts["simclr"] == 0.0  # replaces NT-Xent, as released
    sup.supcon_with_simclr = True
    loss, _ = e2_step_loss(sup, idx, z1, z2, 0.5)
    assert torch.allclose(loss, nt_xent_loss(z1, z2, 0.5) + 2.0 * ref)

    w = sp.random(6, 6, density=0.5, random_state=0, format="csr")
    h = torch.randn(4, 3, generator=g0)
    bank = torch.randn(6, 3, generator=g0)
    lle = Guidance(lle_weights=w, weight=0.5, normalize=False)
    loss, parts = e2_step_loss(lle, idx, z1, z2, 0.5, h_clean=h, bank=bank, contrast_scale=3.0)
    w_rows = torch.from_numpy(w[idx.numpy()].toarray()).float()
    expected = 3.0 * nt_xent_loss(z1, z2, 0.5) + 0.5 * lle_reconstruction_loss(h, w_rows, bank)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert parts["loss"] == pytest.approx((nt_xent_loss(z1, z2, 0.5) + 0.5 * lle_reconstruction_loss(
        h, w_rows, bank)).item(), rel=1e-5)
