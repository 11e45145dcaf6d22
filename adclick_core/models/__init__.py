"""Models: residual Swin trunk, click embedding, heads, ADClick."""
from .adclick import ADClick, ADClickConfig

__all__ = ["ADClick", "ADClickConfig"]
