"""xattn: a fusionlab-compatible cross-attention layer for Keras 3."""

from xattn.layer import CrossAttention

__all__ = ["CrossAttention"]
__version__ = "0.1.0"
