"""Errors the backend answers with a clear HTTP status and message (never a crash).

Label Studio (1.23.2) does not read our JSON body when we answer non-2xx: it only keeps
``str(requests.HTTPError)``, i.e. ``"<code> Client Error: <reason phrase> for url: ..."``.
``api.py`` therefore puts the (sanitised) message into the HTTP reason phrase as well as into
the ``{"error": ...}`` JSON body, so the annotator sees the reason inside Label Studio.
"""
from __future__ import annotations


class BackendError(Exception):
    """An error with an HTTP status for the client. ``status`` is always 4xx or 5xx."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(BackendError):
    """Malformed payload, unusable label config, clicks outside the image, corrupt image..."""

    status = 400


class TooLarge(BackendError):
    """A request, image or batch above a configured bound (the message names the variable)."""

    status = 413


class ImageNotFound(BackendError):
    """The task's image URL points at nothing (404 from Label Studio, unknown file...)."""

    status = 404


class ImageAccessDenied(BackendError):
    """Label Studio refused or could not serve the image download (401/403, unreachable host).

    424 Failed Dependency: the request is fine, the dependency (Label Studio's file server
    with our credentials) failed; the message says which environment variable to fix.
    """

    status = 424


class NoReferences(BackendError):
    """The project has no defect-free reference images yet."""

    status = 409


class ServiceUnavailable(BackendError):
    """The backend itself is not ready (weights missing, model failed to load)."""

    status = 503
