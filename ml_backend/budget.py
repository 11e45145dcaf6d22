"""Bounds on the work one request may cause: a deadline and a budget of decoded pixels.

Every bound on a single input (bytes, pixels, side lengths, tasks) can be met while a request still
asks for minutes of CPU: many large images in one ``/predict``. ``api.py`` opens a
``RequestBudget`` for each request; image decoding charges its pixels to it and the task loops
check its deadline, so one request gets a clear ``413`` / ``503`` instead of the worker's time.
Work outside a request (reference-bank builds, trainings) has no budget: it has its own bounds.
"""
from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import dataclass

from .env import env_float
from .errors import BackendError, TooLarge


class DeadlinePassed(BackendError):
    """The request used up ``ADCLICK_REQUEST_DEADLINE``: 503, try again with less work per request."""

    status = 503



def request_deadline_s() -> float:
    return env_float("ADCLICK_REQUEST_DEADLINE", 120.0, positive=True)


def request_max_pixels() -> int:
    from .convert import MAX_IMAGE_PIXELS  # here, not at the top: convert charges this module

    return int(env_float("ADCLICK_MAX_REQUEST_PIXELS", 2 * MAX_IMAGE_PIXELS, positive=True))


def max_request_bytes() -> int:
    """``ADCLICK_MAX_REQUEST_MB``: the largest request body (the app's 413; the worker's buffers)."""
    return int(env_float("ADCLICK_MAX_REQUEST_MB", 20.0, positive=True) * 1024 * 1024)


@dataclass
class RequestBudget:
    deadline: float  # time.monotonic()
    pixels_left: int
    seconds: float

    def charge_pixels(self, n: int, what: str = "the images") -> None:
        self.pixels_left -= n
        if self.pixels_left < 0:
            raise TooLarge(f"{what} of this request need more than ADCLICK_MAX_REQUEST_PIXELS "
                           f"({request_max_pixels():,}) decoded pixels: send fewer tasks per request")

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise DeadlinePassed(f"the request took longer than ADCLICK_REQUEST_DEADLINE ({self.seconds:.0f} s): "
                                 "send fewer tasks per request")


_current: contextvars.ContextVar[RequestBudget | None] = contextvars.ContextVar("adclick_request_budget",
                                                                                  default=None)


@contextlib.contextmanager
def request_budget(seconds: float | None = None, pixels: int | None = None):
    """The budget of the request being served in this thread (``with request_budget(): ...``)."""
    seconds = request_deadline_s() if seconds is None else seconds
    budget = RequestBudget(time.monotonic() + seconds, request_max_pixels() if pixels is None else pixels, seconds)
    token = _current.set(budget)
    try:
        yield budget
    finally:
        _current.reset(token)


def charge_pixels(n: int, what: str = "the images") -> None:
    budget = _current.get()
    if budget is not None:
        budget.charge_pixels(n, what)


def check_deadline() -> None:
    budget = _current.get()
    if budget is not None:
        budget.check_deadline()
