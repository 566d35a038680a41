"""The shipped demo run works on a machine where its recorded image files do not exist."""
import shutil
from pathlib import Path

import numpy as np
import pytest
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


def test_cmg_predict_scores_a_folder_in_batches(tmp_path, monkeypatch, capsys):
    """`cmg predict FOLDER --run RUN --out CSV`: every image file under the folder (any size), batched; an
    unreadable file gets an error row instead of stopping the job; scores equal the Predictor's one by one."""
    from cmg_core.cli import main
    from cmg_core.predict import Predictor

    monkeypatch.setenv("CMG_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    sizes = [(40, 30), (128, 128), (300, 200), (64, 90), (17, 17)]
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "scores.csv"
    assert main(["predict", str(tmp_path / "imgs"), "--run", str(DEMO), "--out", str(out), "--batch-size", "2",
                 "--method", "ssd", "--method", "cmg", "--quiet"]) == 0
    assert "5 image(s) scored, 1 unreadable" in capsys.readouterr().out
    table = pd.read_csv(out, keep_default_na=False)
    assert len(table) == 6 and list(table.columns) == ["image", "rid_choice", "score_ssd", "anomalous_ssd",
                                                        "score_cmg", "anomalous_cmg", "error"]
    broken = table[table.image.str.endswith("broken.png")]
    assert len(broken) == 1 and broken.error.iloc[0] and broken.score_cmg.iloc[0] == ""
    ok = table[table.error == ""]
    pred = Predictor.load(DEMO)
    for _, row in ok.iterrows():
        res = pred.explain(row.image)
        assert float(row.score_cmg) == pytest.approx(res["scores"]["cmg"], rel=1e-4)
        assert int(row.anomalous_cmg) == int(res["anomalous"]["cmg"])
    assert main(["predict", str(tmp_path / "nothing"), "--run", str(DEMO), "--out", str(out)]) == 2


def test_written_files_get_the_usual_mode(tmp_path):
    """Files are written through a temporary file (atomic replace) but end with the mode open() would give them
    (0o666 less the umask), not mkstemp's 0600: a colleague or an app run by another user can read a run folder."""
    import os

    from cmg_core.runs import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "run" / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "run" / "x.json").stat().st_mode & 0o777 == 0o644


def test_demo_run_explains_in_words():
    """The shipped demo has its language explainer, so the Upload page shows words on a fresh machine."""
    from cmg_core.language import LanguageExplainer

    exp = LanguageExplainer.load(DEMO / "language.npz")
    assert exp.weight.shape[0] == exp.caption_emb.shape[1] == exp.word_emb.shape[1] and len(exp.words) == 999
