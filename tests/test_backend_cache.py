"""ml_backend.cache: size estimation and the memory-bounded LRU of per-image states."""
from __future__ import annotations

import threading
import time

import numpy as np
import torch

from ml_backend.cache import StateCache, StateEntry, estimate_nbytes

MB = 1024 * 1024


class WithNbytes:
    nbytes = 12345


class WithMethod:
    def nbytes(self):
        return 777


class Plain:
    def __init__(self):
        self.a = np.zeros((100, 100), np.float32)  # 40 000
        self.t = torch.zeros(10, 10, dtype=torch.float16)  # 200
        self.lst = [np.zeros(10, np.uint8), torch.zeros(5)]  # 10 + 20
        self.d = {"x": np.zeros(4, np.float64)}  # 32
        self.name = "not counted"


def test_estimate_nbytes():
    assert estimate_nbytes(WithNbytes()) == 12345
    assert estimate_nbytes(WithMethod()) == 777
    assert estimate_nbytes(Plain()) == 40000 + 200 + 10 + 20 + 32
    assert estimate_nbytes(np.zeros(8, np.float32)) == 32
    assert estimate_nbytes({"a": torch.zeros(4)}) == 16


def entry(nbytes):
    return StateEntry(state=object(), width=1, height=1, nbytes=nbytes)


def test_lru_evicts_least_recently_used_by_size():
    c = StateCache(3 * MB)
    for k in "abc":
        c.put(k, entry(MB))
    assert len(c) == 3
    c.get("a")  # a is now the most recent; b the least
    c.put("d", entry(MB))
    assert "b" not in c and all(k in c for k in "acd")
    c.put("e", entry(2 * MB))  # needs two slots: c and a go (oldest first)
    assert set(k for k in "abcde" if k in c) == {"d", "e"}
    assert c.nbytes <= 3 * MB
    assert c.stats()["evictions"] == 3


def test_an_entry_larger_than_the_budget_is_kept_alone():
    c = StateCache(MB)
    c.put("small", entry(MB // 2))
    c.put("huge", entry(5 * MB))
    assert "huge" in c and "small" not in c


def test_stored_predictions_count_towards_the_budget():
    c = StateCache(2 * MB)
    c.put("a", entry(MB // 2))
    c.put("b", entry(MB // 2))
    e = c.get("b")
    e.last["crack"] = ((), np.zeros(MB // 2, np.float16))  # +1 MB
    c.touch_size("b")
    assert c.nbytes <= 2 * MB + 1
    assert "b" in c
    e.last["fray"] = ((), np.zeros(MB // 2, np.float16))  # +1 MB more: "a" must go
    c.touch_size("b")
    assert "a" not in c and "b" in c


def test_get_or_create_builds_once_under_concurrency():
    c = StateCache(10 * MB)
    calls = []

    def create():
        calls.append(1)
        time.sleep(0.2)
        return entry(10)

    out = []
    threads = [threading.Thread(target=lambda: out.append(c.get_or_create("k", create))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sum(1 for _, cached in out if not cached) == 1
    assert len({id(e) for e, _ in out}) == 1
    assert c.stats()["misses"] == 1 and c.stats()["hits"] == 5


def test_failed_create_does_not_poison_the_key():
    c = StateCache(MB)

    def boom():
        raise ValueError("x")

    try:
        c.get_or_create("k", boom)
    except ValueError:
        pass
    e, cached = c.get_or_create("k", lambda: entry(1))
    assert not cached and "k" in c
