"""CMG: vision anomaly detection guided by language (Chen et al., arXiv 2310.02821)."""

__version__ = "0.1.0"
