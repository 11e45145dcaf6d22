"""Models: residual Swin trunk, click embedding, heads, ADClick."""
from .adclick import ADClick, ADClickConfig
from .ensemble import ClickEnsemble

__all__ = ["ADClick", "ADClickConfig", "ClickEnsemble"]
