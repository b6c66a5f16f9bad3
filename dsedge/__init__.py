"""dsedge: DeepSeek-family checkpoints, compressed and exported to run on one card or an edge device."""

__version__ = "0.1.0"
