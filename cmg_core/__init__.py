"""CMG: vision anomaly detection guided by language (Chen et al., arXiv 2310.02821).

The public API (imported on first use, so `import cmg_core` stays light):

    from cmg_core import CMG, SSD, RawKNN    # detectors in the scikit-learn / PyOD shape (cmg_core.api)
    from cmg_core import Predictor           # every method of a finished run folder (cmg_core.predict)
    from cmg_core import MahalanobisDetector # Eq.14 on any features, with a calibrated threshold
    from cmg_core import KNNDetector         # mean distance to the k nearest normal features, calibrated too
    from cmg_core import load_config, train_run
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "Detector": "api", "CMG": "api", "SSD": "api", "SSDER": "api", "SSDLE": "api", "CMGMSE": "api",
    "RawKNN": "api", "BLISS": "api", "SHE": "api", "Predictor": "predict", "MahalanobisDetector": "detector", "KNNDetector": "detector",
    "load_config": "config", "train_run": "train",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'cmg_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy exports (not yet imported, so plain `dir` would miss them) and the module's own names."""
    return sorted(set(globals()) | set(__all__))
