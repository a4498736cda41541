"""``python -m bench``: run the benchmark suite (see ``bench.run``)."""

from __future__ import annotations

from bench.run import main

raise SystemExit(main())
