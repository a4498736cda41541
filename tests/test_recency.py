"""Recency: least recently active first, idle cut-off, runs added outside ingest stamped later."""

from __future__ import annotations

from metricsd.recency import Recency


def test_order_idle_and_late_stamping() -> None:
    r = Recency(idle_timeout=10.0)
    r.advance(100.0)
    for run in ("a", "b", "c"):
        r.add(run, 100.0)
    assert r.touch(["a", "new"], 105.0) == 1  # "new" is not known yet
    assert r.oldest(2) == ["b", "c"]
    assert r.idle(111.0) == ["b", "c"] and r.idle(109.0) == []
    r.add("restored", None)  # a restore: active from the next advance, not from the old clock
    assert r.oldest(1) == ["b"] and r.idle(111.0)[:2] == ["b", "c"]
    r.advance(200.0)
    assert "restored" not in r.idle(205.0)
    r.forget("b")
    assert len(r) == 3 and r.oldest(1) == ["c"]


def test_zero_timeout_means_never_idle() -> None:
    r = Recency(idle_timeout=0.0)
    r.add("a", 0.0)
    assert r.idle(1e12) == []
