"""Number settings from the environment: one parser for every ``ADCLICK_*`` number (a typo in a
variable is logged and the default used, never a crash at start)."""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def env_float(name: str, default: float | None, positive: bool = False) -> float | None:
    """``float($name)``, ``default`` when unset, not a number, or (``positive``) not above 0."""
    v = os.environ.get(name)
    if v in (None, ""):
        return default
    try:
        value = float(v)
    except ValueError:
        logger.warning("%s=%r is not a number: using %s", name, v, default)
        return default
    if positive and not value > 0:
        logger.warning("%s=%r must be above 0: using %s", name, v, default)
        return default
    return value
