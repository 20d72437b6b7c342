"""edge-infer device runtime: local inference with confidence-based cloud offload."""
__version__ = "0.1.0"
