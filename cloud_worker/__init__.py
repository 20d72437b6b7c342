"""edge-infer cloud worker: runs the large model on offloaded samples."""
__version__ = "0.1.0"
