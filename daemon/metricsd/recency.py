"""Which runs are tracked, by last activity: the order capacity and idle eviction follow. Pure.

Runs sit in an ordered dict, least recently active first; one ``move_to_end`` per run and batch,
nothing per event. The Monitor decides what eviction means (final summaries, rows freed); this
only says which runs are oldest or idle, and keeps the clock: ``now`` of the latest ingest or due.
Runs added outside ingest (a restore) count as active from the next ``advance``.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Iterable

__all__ = ["Recency"]


class Recency:
    def __init__(self, idle_timeout: float) -> None:
        """``idle_timeout`` seconds without activity make a run idle; 0 = never."""
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._idle_timeout = idle_timeout or math.inf
        self._unstamped: list[str] = []
        self.clock = 0.0  # the latest ``now`` given to ingest or due

    def __len__(self) -> int:
        return len(self._seen)

    def advance(self, now: float) -> None:
        """Remember ``now``; runs added outside ingest become active as of it."""
        self.clock = now
        if self._unstamped:
            seen = self._seen
            for run_id in self._unstamped:
                if run_id in seen:
                    seen[run_id] = now
                    seen.move_to_end(run_id)
            self._unstamped.clear()

    def touch(self, runs: Iterable[str], now: float) -> int:
        """Move the known ``runs`` to the recent end; the number of runs not known yet."""
        seen = self._seen
        new = 0
        for run_id in runs:
            if run_id in seen:
                seen[run_id] = now
                seen.move_to_end(run_id)
            else:
                new += 1
        return new

    def oldest(self, n: int) -> list[str]:
        """The ``n`` least recently active runs."""
        return list(itertools.islice(self._seen, n))

    def add(self, run_id: str, now: float | None) -> None:
        """A new run, active at ``now`` (None: from the next ``advance``)."""
        if now is None:
            self._unstamped.append(run_id)
        self._seen[run_id] = self.clock if now is None else now

    def forget(self, run_id: str) -> None:
        self._seen.pop(run_id, None)

    def idle(self, now: float) -> list[str]:
        """Runs whose last activity is more than ``idle_timeout`` before ``now``."""
        cutoff = now - self._idle_timeout
        idle: list[str] = []
        for run_id, seen in self._seen.items():
            if seen >= cutoff:
                break  # least recent first: the rest are more recent
            idle.append(run_id)
        return idle
