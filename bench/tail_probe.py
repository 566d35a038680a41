"""Probe: does CMLE help once part of the frozen trunk may change? (frozen profile, UCM, dev task seeds)

    .venv/bin/python bench/tail_probe.py experiments/sweeps/ucm_captions_cmle.weight=1 100 101 102 103 104

E2 = the EfficientNet-Lite0's last stage (blocks[6] + conv_head + bn2, ImageNet weights, frozen BatchNorm
statistics, lr `LR_TAIL`, default 1e-4) + the frozen profile's E2Head, trained `EPOCHS` (40) epochs on 4 cached
SimCLR views per image with NT-Xent, and for ssd+le + lambda * L_global (Eq.13, the run's cmle settings).
Scored as the runs are (MahalanobisDetector on h). Uses each task run's split (images.csv); prints the
run's own head-only SSD for comparison. About 2.5 min per task on 2 cores. Not part of the product: a
measurement behind the README's CMLE discussion.
"""
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cmg_core.cmle import cmle_weights, fit_caption_clusters
from cmg_core.data import load_dataset
from cmg_core.detector import MahalanobisDetector
from cmg_core.encoders import build_backbone
from cmg_core.features import images_to_tensor, simclr_augment, to_float
from cmg_core.losses import lle_reconstruction_loss, nt_xent_loss
from cmg_core.metrics import detection_metrics
from cmg_core.models import E2Head
from cmg_core.encoders import caption_tensor
from cmg_core.runs import Run
from cmg_core.stages import mean_caption_embedding

torch.set_num_threads(2)
exp = Path(sys.argv[1])
seeds = [int(s) for s in sys.argv[2:]]
LR_TAIL = float(os.environ.get("LR_TAIL", "1e-4"))
EPOCHS = int(os.environ.get("EPOCHS", "40"))
V = 4

model, spec = build_backbone("efficientnet_lite0", pretrained=True)
model.eval()
mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
std = torch.tensor(spec.std).view(1, 3, 1, 1)


@torch.inference_mode()
def pre_tail(x):
    out = []
    for s in range(0, len(x), 64):
        h = (x[s:s + 64] - mean) / std
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model.bn1(model.conv_stem(h))
            for b in model.blocks[:6]:
                h = b(h)
        out.append(h.float())
    return torch.cat(out)


def make_tail():
    t = torch.nn.Sequential(copy.deepcopy(model.blocks[6]), copy.deepcopy(model.conv_head), copy.deepcopy(model.bn2))
    return t


cfg = Run.open(exp / f"task_seed{seeds[0]}").config()
ds = load_dataset(cfg.data.name, cfg.data.root, **cfg.data.options)
SIZE = cfg.data.image_size
t0 = time.time()
clean_all = torch.cat([pre_tail(to_float(images_to_tensor(ds.paths[s:s + 64], SIZE)))
                       for s in range(0, len(ds.paths), 64)])
print("pre-tail maps of every image", tuple(clean_all.shape), f"{time.time() - t0:.0f}s", flush=True)

c = cfg.cmle

for seed in seeds:
    run = Run.open(exp / f"task_seed{seed}")
    images = run.images()
    rows = images["index"].to_numpy()
    n = int((images.role == "train").sum())
    y = images.is_anomaly.to_numpy()[n:]
    clean = clean_all[torch.as_tensor(rows)]
    torch.manual_seed(seed)
    aug = simclr_augment(SIZE)
    imgs = to_float(images_to_tensor([ds.paths[i] for i in rows[:n]], SIZE))
    views = torch.stack([pre_tail(torch.stack([aug(im) for im in imgs])) for _ in range(V)], 1)  # (n, V, C, h, w)
    caps = mean_caption_embedding(caption_tensor(ds, rows[:n], cfg.model.text_model)).numpy().astype(np.float64)
    labels, _ = fit_caption_clusters(caps, c.n_clusters, c.covariance_type, seed=cfg.train.seed * 1000 + 4)
    W = torch.from_numpy(cmle_weights(caps, labels, c.n_neighbors, c.reg).toarray()).float()
    res = {}
    for method, lam in (("ssd", 0.0), ("ssd+le", c.weight)):
        t0 = time.time()
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        tail = make_tail()
        tail.eval()  # frozen BN statistics; weights train
        head = E2Head(model.num_features, cfg.model.head_hidden, cfg.model.embed_dim)
        opt = torch.optim.AdamW([{"params": tail.parameters(), "lr": LR_TAIL},
                                 {"params": head.parameters(), "lr": 1e-3}], weight_decay=1e-4)

        def enc(m):
            return head(tail(m).mean((-2, -1)))

        for epoch in range(EPOCHS):
            head.train()
            perm = torch.randperm(n, generator=gen)
            bs = cfg.e2.batch_size
            for s in range(0, n - n % bs, bs):
                idx = perm[s:s + bs]
                a = torch.randint(V, (len(idx),), generator=gen)
                b = (a + 1 + torch.randint(V - 1, (len(idx),), generator=gen)) % V
                _, z1 = enc(views[idx, a])
                _, z2 = enc(views[idx, b])
                loss = nt_xent_loss(z1, z2, cfg.e2.temperature)
                if lam:
                    h_all = F.normalize(enc(clean[:n])[0], dim=-1)
                    loss = loss + lam * lle_reconstruction_loss(h_all[idx], W[idx], h_all)
                opt.zero_grad()
                loss.backward()
                opt.step()
        head.eval()
        with torch.no_grad():
            h = torch.cat([enc(clean[s:s + 256])[0] for s in range(0, len(clean), 256)]).numpy().astype(np.float64)
        sc = MahalanobisDetector(1, "auto").fit(h[:n]).score(h[n:])
        res[method] = detection_metrics(y, sc)["auroc"]
        print(f"seed {seed} {method}: {res[method]:.2f} ({time.time() - t0:.0f}s)", flush=True)
    print(f"seed {seed}: the run's head-only ssd {run.metrics()['ssd']['auroc']:.2f}", flush=True)
