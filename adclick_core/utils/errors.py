"""Exceptions the core raises; callers (CLI, backend) turn them into clear messages / HTTP 4xx."""
from __future__ import annotations


class AdclickError(Exception):
    """Base class of every error the core raises on purpose."""


class InputError(AdclickError, ValueError):
    """The caller's input is unusable: corrupt image, click outside the image, wrong shape..."""


class MissingWeightsError(AdclickError, FileNotFoundError):
    """Pretrained weights or a checkpoint are missing; the message says how to get them."""


class DataError(AdclickError, FileNotFoundError):
    """A data folder or file the caller named is missing or not in the expected (MVTec) layout."""


class EmptyBankError(AdclickError, RuntimeError):
    """A reference bank is needed but holds no defect-free image yet."""


class CheckpointError(AdclickError, RuntimeError):
    """A checkpoint is unreadable or does not match the backbone / bank it is used with."""
