"""The shipped demo run works on a machine where its recorded image files do not exist."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cmg_core.runs import Run, find_runs

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo_run"


def test_demo_run_regenerates_missing_images(tmp_path, monkeypatch):
    run_dir = tmp_path / "demo_run"
    shutil.copytree(DEMO, run_dir)
    images = pd.read_csv(run_dir / "images.csv")
    images["path"] = [f"/nonexistent/machine/{p.split('/', 3)[-1]}" for p in images.path]
    images.to_csv(run_dir / "images.csv", index=False)
    monkeypatch.setenv("CMG_CACHE_DIR", str(tmp_path / "fresh_cache"))
    paths = Run.open(run_dir).image_paths()
    assert len(paths) == len(images) and all(Path(p).is_file() for p in paths)
    assert all(str(tmp_path / "fresh_cache") in p for p in paths)  # regenerated, not found elsewhere
    # the regenerated file of each row is that row's image (same id, a real 128 px image)
    assert all(Path(p).stem == iid.split("/")[-1] for p, iid in zip(paths, images.image_id))
    assert Image.open(paths[0]).size == (128, 128)


def test_demo_run_is_complete_and_found():
    run = Run.open(DEMO)
    assert run.status == "done" and set(run.methods) == {"ssd", "ssd+er", "ssd+le", "cmg", "cmg-mse"}
    assert np.isfinite(run.scores()[[f"score_{m}" for m in run.methods]].values).all()
    assert run.analysis("latent") is not None and run.analysis("dcor") is not None
    assert any(r.path.resolve() == DEMO.resolve() for r in find_runs(DEMO))
