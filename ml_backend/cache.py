"""Memory-bounded LRU cache of per-image residual states.

Key: (image content hash, reference bank fingerprint, model id). Value: the predictor's state
for that image plus the last prediction per click label (used as ``prev_mask`` when the next
request extends the same click history). The second and later clicks on an image therefore only
run the light model; the expensive ``set_image`` runs once per image and bank.

The size of an entry is ``state.nbytes`` when the state exposes it, else the numpy arrays and
torch tensors found in its ``__dict__`` (one level into lists / tuples / dicts).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import numpy as np

__all__ = ["estimate_nbytes", "StateEntry", "StateCache"]


def _leaf_nbytes(v: Any) -> int:
    if isinstance(v, np.ndarray):
        return int(v.nbytes)
    try:
        import torch

        if isinstance(v, torch.Tensor):
            return int(v.numel() * v.element_size())
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return 0


def estimate_nbytes(obj: Any) -> int:
    """Bytes held by a state object (see module doc)."""
    nb = getattr(obj, "nbytes", None)
    if callable(nb):
        try:
            nb = nb()
        except TypeError:
            nb = None
    if isinstance(nb, (int, np.integer)) and not isinstance(obj, np.ndarray):
        return int(nb)
    direct = _leaf_nbytes(obj)
    if direct:
        return direct
    items: list[Any] = []
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    elif hasattr(obj, "__slots__"):
        items = [getattr(obj, s, None) for s in obj.__slots__]
    total = 0
    for v in items:
        n = _leaf_nbytes(v)
        if not n and isinstance(v, (list, tuple)):
            n = sum(_leaf_nbytes(x) for x in v)
        elif not n and isinstance(v, dict):
            n = sum(_leaf_nbytes(x) for x in v.values())
        total += n
    return total


@dataclass
class StateEntry:
    state: Any
    width: int
    height: int
    nbytes: int
    # label -> (clicks tuple, probability map) of the last answer, for prev_mask
    last: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def total_nbytes(self) -> int:
        return self.nbytes + sum(int(p.nbytes) for _, p in self.last.values())


class StateCache:
    """Thread-safe LRU bounded by bytes. ``get_or_create`` computes a missing state once even when
    several requests for the same image arrive together."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries: "OrderedDict[Hashable, StateEntry]" = OrderedDict()
        self._lock = threading.Lock()
        self._pending: dict[Hashable, threading.Event] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # ------------------------------------------------------------ stats
    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.total_nbytes() for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": sum(e.total_nbytes() for e in self._entries.values()),
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }

    # ------------------------------------------------------------ access
    def get(self, key: Hashable) -> StateEntry | None:
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                self._entries.move_to_end(key)
            return e

    def put(self, key: Hashable, entry: StateEntry) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            self._evict_locked(keep=key)

    def touch_size(self, key: Hashable) -> None:
        """Re-check the budget after an entry grew (a new prev-mask stored)."""
        with self._lock:
            self._evict_locked(keep=key)

    def _evict_locked(self, keep: Hashable | None = None) -> None:
        total = sum(e.total_nbytes() for e in self._entries.values())
        for k in list(self._entries.keys()):
            if total <= self.max_bytes:
                break
            if k == keep:
                continue  # the entry in use stays, even if alone it exceeds the budget
            total -= self._entries.pop(k).total_nbytes()
            self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get_or_create(
        self, key: Hashable, create: Callable[[], StateEntry]
    ) -> tuple[StateEntry, bool]:
        """(entry, was_cached). ``create`` runs outside the cache lock, once per key at a time."""
        while True:
            with self._lock:
                e = self._entries.get(key)
                if e is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return e, True
                ev = self._pending.get(key)
                if ev is None:
                    ev = threading.Event()
                    self._pending[key] = ev
                    mine = True
                else:
                    mine = False
            if not mine:
                ev.wait()
                continue  # re-check: the creator stored it (or failed and we try ourselves)
            try:
                entry = create()
                with self._lock:
                    self.misses += 1
                self.put(key, entry)
                return entry, False
            finally:
                with self._lock:
                    self._pending.pop(key, None)
                ev.set()
