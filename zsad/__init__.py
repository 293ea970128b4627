"""zsad: CLIP-based zero-shot anomaly detection, re-implemented faithfully in one package.

Modules are small and import lazily where torch/open_clip would make ``import zsad`` slow.
"""

__version__ = "0.1.0"
