"""cbir: content-based medical image retrieval on metric-learned features, Redis and FAISS."""

__version__ = "0.1.0"
