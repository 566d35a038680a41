"""Language explanations of a verdict: place an image in the caption space and say, in words, what it is close to.

A run with a frozen E1 trunk stores `language.npz`: the map of trunk features into the text model's space
(the ridge regression BLISS uses, `cmg_core.train.baselines.text_space_map`), the normal training images' captions
and their embeddings, the GMM caption clusters of CMLE (their mean embeddings and example captions) and the BLISS
dictionary's embeddings. For an image, `LanguageExplainer.explain` gives

* the nearest normal training captions (cosine similarity in the text model's space),
* the dictionary words it is most similar to, and
* the GMM caption cluster whose mean caption embedding it falls nearest to.

An image that looks normal lands near captions of normal images with a high similarity; an anomaly's nearest
captions are less similar, and its words and cluster say what it resembles.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .scoring import l2_normalize
from .utils import atomic_path, load_npz


@dataclass
class LanguageExplainer:
    """weight (T, F), bias (T,): trunk features -> text space; captions (N,) texts with embeddings (N, T);
    cluster_means (K, T) with cluster_examples (K,) one example caption each; words (J,) with embeddings (J, T)."""

    weight: np.ndarray
    bias: np.ndarray
    captions: np.ndarray
    caption_emb: np.ndarray
    cluster_means: np.ndarray
    cluster_examples: np.ndarray
    words: np.ndarray
    word_emb: np.ndarray

    def to_text_space(self, trunk_feats: np.ndarray) -> np.ndarray:
        """(B, F) trunk features -> (B, T) L2-normalised points in the text model's space."""
        x = np.asarray(trunk_feats, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.weight.shape[1]:
            raise DataError(f"language explainer expects (B, {self.weight.shape[1]}) trunk features, got {x.shape}")
        return l2_normalize(x @ self.weight.T.astype(np.float64) + self.bias)

    def explain(self, trunk_feats: np.ndarray, n: int = 3) -> list[dict]:
        """Per image: {"captions": [(caption, similarity)] (n nearest normal training captions), "words": [(word,
        similarity)] (n most similar dictionary words), "cluster": (id, similarity, example caption)}."""
        z = self.to_text_space(trunk_feats)
        cap = z @ l2_normalize(self.caption_emb.astype(np.float64)).T  # (B, N)
        words = z @ l2_normalize(self.word_emb.astype(np.float64)).T  # (B, J)
        clus = z @ l2_normalize(self.cluster_means.astype(np.float64)).T  # (B, K)
        out = []
        for i in range(len(z)):
            top_c = np.argsort(-cap[i])[:n]
            top_w = np.argsort(-words[i])[:n]
            k = int(np.argmax(clus[i]))
            out.append({"captions": [(str(self.captions[j]), float(cap[i, j])) for j in top_c],
                        "words": [(str(self.words[j]), float(words[i, j])) for j in top_w],
                        "cluster": (k, float(clus[i, k]), str(self.cluster_examples[k]))})
        return out

    def save(self, path: Path) -> None:
        """A compressed NumPy archive (float16 embeddings; read without pickle)."""
        arrays = {k: (v.astype(np.float16) if v.dtype.kind == "f" and k.endswith("emb") else v)
                  for k, v in self.__dict__.items()}
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        with atomic_path(Path(path)) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> "LanguageExplainer":
        data = load_npz(path)
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise DataError(f"{path} is not a language explainer written by this tool (entries {sorted(data)})")
        return cls(**data)


def build_explainer(weight: np.ndarray, bias: np.ndarray, caption_mean: np.ndarray, captions: list[list[str]],
                    caption_emb: np.ndarray, cluster_labels: np.ndarray, words: list[str],
                    word_emb: np.ndarray) -> LanguageExplainer:
    """From the map of trunk features into the text space (weight (T, F), bias (T,); `text_space_map`) and the normal
    training images: mean caption embeddings (N, T), their captions (N lists) with embeddings (N, C, T) (unique
    captions are kept), GMM caption-cluster labels (N,), and the dictionary words (J,) with embeddings (J, T)."""
    texts, embs = {}, []
    for i, caps in enumerate(captions):
        for j, c in enumerate(caps):
            if c not in texts:
                texts[c] = len(embs)
                embs.append(caption_emb[i, j])
    labels = np.asarray(cluster_labels)
    ks = np.unique(labels)
    means = np.stack([np.asarray(caption_mean)[labels == k].mean(0) for k in ks])
    examples = []
    for k in ks:  # the caption of the cluster member nearest the cluster mean
        members = np.flatnonzero(labels == k)
        d = ((np.asarray(caption_mean)[members] - means[list(ks).index(k)]) ** 2).sum(1)
        examples.append(captions[members[int(np.argmin(d))]][0])
    return LanguageExplainer(np.asarray(weight, dtype=np.float32), np.asarray(bias, dtype=np.float32),
                             np.asarray(list(texts), dtype=str), np.stack(embs).astype(np.float32),
                             means.astype(np.float32), np.asarray(examples, dtype=str), np.asarray(words, dtype=str),
                             np.asarray(word_emb, dtype=np.float32))
