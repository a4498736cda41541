"""metricsd's benchmark suite: ``python -m bench`` (``--quick`` for a < 60 s smoke run).

Modules: ``ingest`` (daemon vs bare consume loop on a pre-loaded topic), ``tick`` (``Monitor.due``
vs a per-run NumPy loop; the profiler's cost), ``latency`` (event sent → covering summary read),
``memory`` (RSS vs window arrays, in a subprocess), ``common`` (figures, targets, machine line),
``run`` (the command: runs them, writes ``bench/results/latest.{json,md}``). See bench/README.md.
"""
