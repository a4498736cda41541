"""The training-side client: ``Emitter`` (sync) and ``AsyncEmitter`` send events to metricsd.

Plan
----
Operations: one call per event (``batch_time``, ``step()``, ``timed()``, ``scalar(s)``,
``predictions``, ``cv_fold``, ``attention``, ``features``; ``close`` sends ``run_end``). A call
validates its input, stamps ``ts`` and appends one item to a bounded in-memory queue
(``metricsd.batching.Queue``), then returns: no I/O, no Kafka, no waiting (unless you chose
``policy="block"``). A background thread (daemon thread ``metricsd-emitter``, its own asyncio
loop) takes what is queued every ``linger`` seconds, coalesces it (``metricsd.batching.Encoder``:
consecutive step times of the run become one ``batch_time`` with an array of seconds, scalars of
one name one ``scalar`` with an array value), serialises it with orjson and produces it with the
daemon's own producer factory ``metricsd.kafka.producer`` (TLS/SASL from
``metricsd.config.Security``; key = run_id, so a run stays on one partition and in order).
aiokafka is imported in that thread, on first use: importing ``metricsd`` or this module imports
no Kafka code and starts no thread.

Contract, per call:

- It never raises because of Kafka and never blocks (``policy="drop_oldest"``, the default: when
  the queue is full the oldest item is discarded and counted in ``stats()["dropped"]``;
  ``policy="block"`` waits for room instead, never longer than until ``close``).
- Bad input raises at the call site, never later: ``TypeError`` for what is not a number or an
  array of numbers (strings, booleans, None, object arrays), ``ValueError`` for a wrong value (NaN
  or infinity anywhere but in a scalar, a negative duration, a wrong shape, an empty or
  >10000-item array, a label out of range, unequal ``y_true``/``y_pred`` lengths). Nothing invalid
  is ever queued, so the background thread never meets bad input, and the daemon never dead-
  letters what this client sends. A NaN or infinite *scalar* (a diverged loss) is not bad input
  but a training fault to surface: it is sent as null and counted as ``non_finite`` in the
  daemon's window of that scalar.
- Arrays: Python lists, NumPy arrays and anything with ``__array__`` (a torch CPU tensor is read
  through it). Exactly one copy is made at the call (the caller may reuse its buffer after the call
  returns): a CUDA tensor is copied to the host once (``.detach().cpu()``) and that copy is kept.
  orjson serialises the copy directly (no ``tolist``).

Counters (``stats()``): ``enqueued`` (calls accepted), ``sent`` (calls delivered, acknowledged by
the broker), ``dropped`` (calls discarded: queue overflow, or still queued / made after ``close``),
``delivery_errors`` (calls whose record the broker refused or did not acknowledge), ``queue_depth``,
``in_flight``, ``records_sent``, ``heartbeats``, ``connect_errors``; always
``enqueued == sent + dropped + delivery_errors + queue_depth + in_flight``.

Heartbeat: every ``heartbeat_interval`` seconds (default 10; 0 disables it), and once more just
before ``run_end``, the emitter sends ``{"type":"scalar","name":"emitter/dropped","value":N}``
where N = ``dropped + delivery_errors`` so far: the daemon's summaries then show when a run's data
is incomplete. It does not go through the queue and is not counted in ``enqueued``/``sent``.

Lifecycle: ``flush(timeout)`` waits until everything queued before it is delivered (or failed);
``close(status="completed", timeout)`` sends ``run_end`` (with ``status``), flushes and stops the
thread; both return whether everything was delivered in time. In a distributed run only rank 0 (or
an emitter with no rank) sends ``run_end`` by default: the daemon ends the whole run on the first
``run_end``, so a rank that closed early would otherwise end it for the ranks still training; the
others only flush and stop (``close(run_end=True)`` sends it anyway). ``with Emitter(...) as em:``
closes on exit (status ``"failed"`` when an exception escapes). An ``atexit`` hook flushes every
emitter that was not closed, at most ``atexit_timeout`` seconds each, and sends no ``run_end`` (the
interpreter cannot tell a finished run from a crashed one). After a ``fork`` (DataLoader workers,
``multiprocessing``), the child's copy of an emitter is disabled: its calls do nothing (counted in
``stats()["ignored"]``), it has no thread, ``flush``/``close`` return at once; create a new
``Emitter`` in the child if it must send. The parent's emitter is unaffected.

Configuration: arguments, else ``METRICSD_*`` environment variables of the same names as the
daemon's flags (``METRICSD_BOOTSTRAP_SERVERS``, ``METRICSD_INPUT_TOPIC``,
``METRICSD_SECURITY_PROTOCOL``, ``METRICSD_SSL_CAFILE``, ``METRICSD_SSL_CERTFILE``,
``METRICSD_SSL_KEYFILE``, ``METRICSD_SSL_CHECK_HOSTNAME``, ``METRICSD_SASL_MECHANISM``,
``METRICSD_SASL_USERNAME``, ``METRICSD_SASL_PASSWORD``, ``METRICSD_SASL_PASSWORD_FILE``), plus
``METRICSD_RUN_ID`` and ``METRICSD_DISABLED=1``. ``rank`` comes from ``RANK`` (else ``LOCAL_RANK``),
``world_size`` from ``WORLD_SIZE``; every event carries ``rank`` when it is known. Without a run_id
one is generated (``run-<utc time>-<hex>``): set ``METRICSD_RUN_ID`` so that all ranks share one.
``enabled=False`` (or ``METRICSD_DISABLED=1``) makes every call a no-op that does not even validate.

Logging goes to the stdlib logger ``metricsd.emitter`` (not structlog: a library inside the user's
process must stay silent unless the user configured logging): one warning when the broker cannot be
reached (and one when it can again), one per batch with delivery errors.

Cost: measured by ``python -m bench --only emitter`` (README, "Performance"): a ``scalar`` call
takes well under 1 µs on the caller's thread, ``predictions`` of 1,000 binary pairs under 10 µs
(validation and the one copy); the background thread's share of the GIL is what a step pays.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import operator
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from metricsd.batching import Encoder, Item, Queue
from metricsd.config import ConfigError, Security

__all__ = ["AsyncEmitter", "Emitter", "Sender"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_INF: Final = math.inf
_I64_MAX: Final = 2**63 - 1
_MAX_ITEMS: Final = 10_000
_MAX_NAME: Final = 256
_TASKS: Final = ("binary", "multiclass", "regression")
_SPLIT_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
# dtypes orjson serialises from NumPy as they are; anything else numeric becomes float64.
_KEPT_DTYPES: Final = frozenset(
    np.dtype(t) for t in ("f8", "f4", "i8", "i4", "i2", "i1", "u8", "u4", "u2", "u1")
)
_now = time.time


class Sender(Protocol):
    """What the background thread sends through; ``KafkaSender`` in production, a fake in tests.

    All three run on the emitter's own event loop. ``send`` returns one result per record, in
    order: None when the broker acknowledged it, else the exception. ``start`` raising means "not
    connected yet": the thread retries it with backoff, meanwhile the queue fills (and drops).
    """

    async def start(self) -> None: ...

    async def send(self, records: Sequence[tuple[bytes, bytes]]) -> list[BaseException | None]: ...

    async def stop(self) -> None: ...


class KafkaSender:
    """Records to ``topic`` through ``metricsd.kafka.producer`` (imported here, in the thread)."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        security: Security,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.security = security
        # A send that cannot be acknowledged fails after 15 s, not aiokafka's 40 s default.
        self.options: dict[str, Any] = {"request_timeout_ms": 15_000, **(options or {})}
        self._producer: Any = None

    async def start(self) -> None:
        from metricsd import kafka

        # aiokafka logs every failed reconnect at ERROR; with logging left unconfigured Python's
        # last-resort handler would print each one on the training script's stderr. A NullHandler
        # keeps it quiet there and changes nothing once the user configures logging.
        aiokafka_log = logging.getLogger("aiokafka")
        if not any(isinstance(h, logging.NullHandler) for h in aiokafka_log.handlers):
            aiokafka_log.addHandler(logging.NullHandler())
        producer = kafka.producer(self.bootstrap_servers, security=self.security, **self.options)
        try:
            await producer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self._producer = producer

    async def send(self, records: Sequence[tuple[bytes, bytes]]) -> list[BaseException | None]:
        pending: list[Any] = []
        for key, value in records:
            try:
                pending.append(await self._producer.send(self.topic, value=value, key=key))
            except Exception as exc:  # too large, metadata timeout: this record failed
                pending.append(exc)
        results: list[BaseException | None] = []
        for fut in pending:
            if isinstance(fut, BaseException):
                results.append(fut)
                continue
            try:
                await fut
                results.append(None)
            except Exception as exc:
                results.append(exc)
        return results

    async def stop(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()


# --------------------------------------------------------------------------- input validation
def _host_array(x: Any, what: str) -> tuple[NDArray[Any], bool]:
    """``x`` as a NumPy array, and whether that array is already ours (a fresh copy)."""
    if isinstance(x, np.ndarray):
        return x, False
    if isinstance(x, list | tuple):
        try:
            return np.array(x), True
        except ValueError:
            raise ValueError(f"{what} must be a rectangular array of numbers (ragged?)") from None
    if isinstance(x, str | bytes | bool) or x is None:
        raise TypeError(f"{what} must be numbers, got {type(x).__name__}")
    detach = getattr(x, "detach", None)
    if detach is not None and hasattr(x, "cpu"):  # a torch tensor: leave autograd, leave the GPU
        tensor = detach()
        device = getattr(tensor, "device", None)
        if device is not None and getattr(device, "type", "cpu") != "cpu":
            return np.ascontiguousarray(np.asarray(tensor.cpu())), True  # the one copy
        return np.asarray(tensor), False
    if hasattr(x, "__array__"):
        return np.asarray(x), False
    raise TypeError(
        f"{what} must be a number, a list, a NumPy array or an array-like (__array__), "
        f"got {type(x).__name__}"
    )


def _check_shape(a: NDArray[Any], what: str, ndims: tuple[int, ...]) -> None:
    if a.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{what} must be {want}, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{what} must not be empty, got shape {a.shape}")
    if max(a.shape) > _MAX_ITEMS:
        raise ValueError(f"{what} has more than {_MAX_ITEMS} items along an axis: {a.shape}")


def _floats(
    x: Any, what: str, *, nonnegative: bool = False, ndims: tuple[int, ...] = (1,)
) -> NDArray[Any]:
    """An owned C-contiguous array of finite numbers (``>= 0`` if asked) from ``x``."""
    a, owned = _host_array(x, what)
    return _own_floats(a, owned, what, nonnegative, ndims)


def _own_floats(
    a: NDArray[Any],
    owned: bool,
    what: str,
    nonnegative: bool,
    ndims: tuple[int, ...],
    finite: bool = True,
) -> NDArray[Any]:
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{what} must hold numbers (not booleans or strings), got dtype {a.dtype}")
    _check_shape(a, what, ndims)
    dtype = a.dtype if a.dtype in _KEPT_DTYPES else np.dtype(np.float64)
    a = np.ascontiguousarray(a, dtype=dtype) if owned else np.array(a, dtype=dtype, order="C")
    if finite and a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{what} must be finite (no NaN or infinity)")
    if nonnegative and a.dtype.kind != "u" and (a < 0).any():
        raise ValueError(f"{what} must be >= 0, got min {a.min()}")
    return a


def _labels(x: Any, what: str, limit: int) -> NDArray[np.int64]:
    """An owned 1-D int64 array of class labels in ``[0, limit)``."""
    a, owned = _host_array(x, what)
    kind = a.dtype.kind
    if kind == "f":
        if not np.isfinite(a).all() or not (a == np.round(a)).all():
            raise ValueError(f"{what}: class labels must be integers, got non-integral values")
    elif kind not in "iub":
        raise TypeError(f"{what} must hold integer class labels, got dtype {a.dtype}")
    _check_shape(a, what, (1,))
    labels = a.astype(np.int64, copy=not owned or a.dtype != np.int64)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= limit:
        raise ValueError(f"{what}: class labels must lie in [0, {limit}), got {low}..{high}")
    return labels


def _value(
    x: Any, what: str, nonnegative: bool = False, finite: bool = True
) -> float | NDArray[Any]:
    """A finite number (``>= 0`` if asked) as a float, or an owned 1-D array of them. With
    ``finite=False`` (scalars) NaN and infinity pass: they are sent as null, and the daemon
    counts them as ``non_finite`` in the window (a NaN loss is a training fault to surface)."""
    t = type(x)
    if t is float or t is int:
        try:
            v = float(x)
        except OverflowError:
            raise ValueError(f"{what} {x!r} is beyond the float64 range") from None
    else:
        a, owned = _host_array(x, what)
        if a.ndim:
            return _own_floats(a, owned, what, nonnegative, (1,), finite)
        if a.dtype.kind not in "iuf":
            raise TypeError(f"{what} must be a number, got {type(x).__name__} ({a.dtype})")
        v = float(a)
    if finite and not -_INF < v < _INF:
        raise ValueError(f"{what} must be finite, got {v}")
    if nonnegative and v < 0.0:
        raise ValueError(f"{what} must be >= 0, got {v}")
    return v


def _number(x: Any, what: str) -> float:
    v = _value(x, what)
    if not isinstance(v, float):
        raise ValueError(f"{what} must be one number, got an array of shape {v.shape}")
    return v


def _index(x: Any, what: str) -> int:
    """An integer in ``[0, 2**63 - 1]`` (``step``, ``fold``); NumPy integers accepted."""
    if type(x) is not int:
        if isinstance(x, bool):
            raise TypeError(f"{what} must be an integer, got a bool")
        try:
            x = operator.index(x)
        except TypeError:
            raise TypeError(f"{what} must be an integer, got {type(x).__name__}") from None
    if not 0 <= x <= _I64_MAX:
        raise ValueError(f"{what} must be in 0..2**63-1, got {x}")
    return int(x)


def _name(name: Any) -> str:
    if type(name) is not str or not 0 < len(name) <= _MAX_NAME:
        raise (TypeError if not isinstance(name, str) else ValueError)(
            f"a scalar name must be a string of 1 to {_MAX_NAME} characters, got {name!r:.80}"
        )
    return name


# --------------------------------------------------------------------------- configuration
def _env(name: str) -> str | None:
    value = os.environ.get(f"METRICSD_{name}")
    return value if value not in (None, "") else None


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    return None


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _security_from_env() -> Security:
    password = _env("SASL_PASSWORD")
    path = _env("SASL_PASSWORD_FILE")
    if path is not None:
        if password is not None:
            raise ConfigError("give the SASL password once: METRICSD_SASL_PASSWORD or _FILE")
        try:
            password = Path(path).read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
        except OSError as exc:
            raise ConfigError(f"sasl-password-file {path!r} cannot be read: {exc}") from None
    check = _env("SSL_CHECK_HOSTNAME")
    return Security(
        security_protocol=(_env("SECURITY_PROTOCOL") or "PLAINTEXT").upper(),
        ssl_cafile=_env("SSL_CAFILE"),
        ssl_certfile=_env("SSL_CERTFILE"),
        ssl_keyfile=_env("SSL_KEYFILE"),
        ssl_check_hostname=True if check is None else _truthy(check),
        sasl_mechanism=(_env("SASL_MECHANISM") or "").upper() or None,
        sasl_username=_env("SASL_USERNAME"),
        sasl_password=password,  # type: ignore[arg-type]  # Security wraps a str in Secret
    )


def _new_run_id() -> str:
    return f"run-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------- fork and exit
_LIVE: weakref.WeakSet[_Base] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for emitter in list(_LIVE):
        emitter._disable_after_fork()


def _at_exit() -> None:
    for emitter in list(_LIVE):
        emitter._flush_at_exit()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)


# --------------------------------------------------------------------------- the thread
class _Worker:
    """The background thread: take, coalesce, send, settle; heartbeats; reconnects."""

    def __init__(
        self,
        queue: Queue,
        encoder: Encoder,
        sender: Sender,
        *,
        linger: float,
        heartbeat_interval: float,
    ) -> None:
        self.queue = queue
        self.encoder = encoder
        self.sender = sender
        self.linger = linger
        self.heartbeat_interval = heartbeat_interval
        self.sent = 0
        self.delivery_errors = 0
        self.records_sent = 0
        self.heartbeats = 0
        self.connect_errors = 0
        self.connected = False
        self.stop_timeout = 5.0
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="metricsd-emitter", daemon=True)
        self.thread.start()
        self._ready.wait(5.0)

    @property
    def lost(self) -> int:
        return self.queue.dropped + self.delivery_errors

    def wake(self) -> None:
        """Send what is queued now instead of after the linger (from any thread)."""
        loop, event = self._loop, self._wake
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop has just closed
                loop.call_soon_threadsafe(event.set)

    def stop(self, timeout: float) -> None:
        self.stop_timeout = max(timeout, 0.1)
        self._stopping = True
        self.wake()
        self.thread.join(timeout)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop))
        except BaseException:  # a bug here must not pass silently, nor kill the caller
            log.exception("metricsd emitter thread failed")
        finally:
            loop.close()

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake = asyncio.Event()
        self._loop = loop
        self._ready.set()
        delay = 0.1
        next_beat = time.monotonic() + self.heartbeat_interval
        while not self._stopping:
            try:
                await self.sender.start()
            except Exception as exc:
                self.connect_errors += 1
                if self.connect_errors == 1:
                    log.warning("metricsd emitter cannot reach the broker (retrying): %s", exc)
                await self._sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.connected = True
            if self.connect_errors:
                log.warning("metricsd emitter connected after %d attempts", self.connect_errors)
            break
        if not self.connected:
            return
        try:
            while True:
                stopping = self._stopping
                items = self.queue.take()
                now = time.monotonic()
                beat = self.heartbeat_interval > 0 and now >= next_beat
                if beat:
                    next_beat = now + self.heartbeat_interval
                    items.append(("heartbeat", None, None, None, _now()))
                if items:
                    await self._send(items)
                if stopping:
                    break
                await self._sleep(self.linger)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.sender.stop(), self.stop_timeout)

    async def _send(self, items: list[Item]) -> None:
        if self.heartbeat_interval > 0:
            for i, item in enumerate(items):  # the last heartbeat goes just before run_end
                if item[0] == "run_end":
                    items.insert(i, ("heartbeat", None, None, None, item[4]))
                    break
        records = self.encoder.encode(items, lost=self.lost)
        try:
            results = await self.sender.send([(key, value) for key, value, _ in records])
        except Exception as exc:  # a sender failing as a whole: every record failed
            results = [exc] * len(records)
        failed = 0
        for (_, _, n), result in zip(records, results, strict=True):
            if n == 0:
                self.heartbeats += result is None
            elif result is None:
                self.sent += n
                self.records_sent += 1
            else:
                self.delivery_errors += n
                failed += 1
        if failed:
            error = next(r for r in results if r is not None)
            log.warning(
                "metricsd emitter: %d of %d records undelivered: %r", failed, len(records), error
            )
        self.queue.settle(sum(n for _, _, n in records))


# --------------------------------------------------------------------------- the public classes
class _Step:
    """``with emitter.step():`` times its body and sends it as one ``batch_time``."""

    __slots__ = ("_emitter", "_start", "_step")

    def __init__(self, emitter: _Base, step: int | None) -> None:
        self._emitter = emitter
        self._step = step
        self._start = 0.0

    def __enter__(self) -> _Step:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._emitter.batch_time(time.perf_counter() - self._start, self._step)


class _Base:
    """The calls shared by :class:`Emitter` and :class:`AsyncEmitter` (see the module doc)."""

    def __init__(
        self,
        run_id: str | None = None,
        *,
        bootstrap_servers: str | None = None,
        topic: str | None = None,
        security: Security | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        enabled: bool | None = None,
        queue_size: int = 100_000,
        policy: str = "drop_oldest",
        linger: float = 0.5,
        heartbeat_interval: float = 10.0,
        atexit_timeout: float = 5.0,
        max_classes: int = 1000,
        producer_options: Mapping[str, Any] | None = None,
        sender: Sender | None = None,
    ) -> None:
        if enabled is None:
            disabled = _env("DISABLED")
            enabled = not (disabled is not None and _truthy(disabled))
        run_id = run_id or _env("RUN_ID") or _new_run_id()
        if type(run_id) is not str or len(run_id) > 256:
            raise ConfigError(f"run_id must be a string of 1 to 256 characters, got {run_id!r:.80}")
        _index(rank, "rank") if rank is not None else None
        self.run_id: Final = run_id
        self.rank: Final = rank if rank is not None else _env_int("RANK", "LOCAL_RANK")
        self.world_size: Final = world_size if world_size is not None else _env_int("WORLD_SIZE")
        self.bootstrap_servers: Final = (
            bootstrap_servers or _env("BOOTSTRAP_SERVERS") or "localhost:9092"
        )
        self.topic: Final = topic or _env("INPUT_TOPIC") or "training.events"
        if not linger > 0 or not heartbeat_interval >= 0 or not atexit_timeout >= 0:
            raise ConfigError("linger must be > 0, heartbeat_interval and atexit_timeout >= 0")
        if type(max_classes) is not int or max_classes < 2:
            raise ConfigError(f"max_classes must be an int >= 2, got {max_classes!r}")
        self.max_classes: Final = max_classes
        self.atexit_timeout = atexit_timeout
        self.enabled: Final = bool(enabled)
        self._queue = Queue(queue_size, policy)
        self._on = self.enabled  # False: calls return at once (disabled, or a forked child)
        self._forked = False
        self._closed = False
        self._ignored = 0
        self._pid = os.getpid()
        self._worker: _Worker | None = None
        if not self.enabled:
            return
        if sender is None:
            sender = KafkaSender(
                self.bootstrap_servers,
                self.topic,
                security if security is not None else _security_from_env(),
                producer_options,
            )
        encoder = Encoder(run_id, self.rank, max_items=_MAX_ITEMS)
        self._worker = _Worker(
            self._queue, encoder, sender, linger=linger, heartbeat_interval=heartbeat_interval
        )
        _LIVE.add(self)

    # ------------------------------------------------------------------ calls
    def batch_time(self, seconds: Any, step: int | None = None) -> None:
        """One batch took ``seconds`` (>= 0), or an array of durations of several batches."""
        if not self._on:
            self._ignored += 1
            return
        if type(seconds) is not float or not 0.0 <= seconds < _INF:
            seconds = _value(seconds, "seconds", nonnegative=True)
        if step is not None and (type(step) is not int or not 0 <= step <= _I64_MAX):
            step = _index(step, "step")
        self._queue.put(("batch_time", "batch_time", seconds, step, _now()))

    def step(self, step: int | None = None) -> _Step:
        """``with em.step():`` sends the duration of the block as one ``batch_time``."""
        return _Step(self, step)

    def timed(self, loader: Iterable[T], *, start: int | None = None) -> Iterator[T]:
        """Yield the batches of ``loader``; each batch's time (from asking for it to asking for the
        next: loading plus your step) is sent as a ``batch_time``, with ``step`` = ``start``,
        ``start + 1``, ... when ``start`` is given."""
        clock = time.perf_counter
        step = start
        t0 = clock()
        for batch in loader:
            yield batch
            t1 = clock()
            self.batch_time(t1 - t0, step)
            if step is not None:
                step += 1
            t0 = t1

    def scalar(self, name: str, value: Any, step: int | None = None) -> None:
        """A named number (loss, lr, grad norm...) or a 1-D array of them, as a ``scalar`` event."""
        if not self._on:
            self._ignored += 1
            return
        self._queue.put(self._scalar_item(name, value, step, _now()))

    def scalars(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """``scalar`` for each ``name: value``, with one lock round; all validated before any is
        queued (a bad one raises and none is sent)."""
        if not self._on:
            self._ignored += 1
            return
        if type(values) is not dict and not isinstance(values, Mapping):
            raise TypeError(
                f"scalars takes a mapping of name -> value, got {type(values).__name__}"
            )
        ts = _now()
        self._queue.put_many([self._scalar_item(n, v, step, ts) for n, v in values.items()])

    @staticmethod
    def _scalar_item(name: str, value: Any, step: int | None, ts: float) -> Item:
        if type(name) is not str or not 0 < len(name) <= _MAX_NAME:
            name = _name(name)
        if type(value) is not float:
            value = _value(value, f"scalar {name!r}", finite=False)
        if step is not None and (type(step) is not int or not 0 <= step <= _I64_MAX):
            step = _index(step, "step")
        return ("scalar", name, value, step, ts)

    def predictions(
        self, y_true: Any, y_pred: Any, *, task: str = "binary", split: str | None = None
    ) -> None:
        """Ground truth and predictions of one batch: labels 0/1 (``binary``), class indices
        ``0 <= label < max_classes`` (``multiclass``) or numbers (``regression``), equal lengths;
        ``split`` (default "val" on the daemon side) is 1-64 of ``A-Z a-z 0-9 _ . -``."""
        if not self._on:
            self._ignored += 1
            return
        if task not in _TASKS:
            raise ValueError(f"task must be one of {', '.join(_TASKS)}, got {task!r}")
        if split is not None and (type(split) is not str or _SPLIT_RE.match(split) is None):
            raise ValueError(f"split must be 1 to 64 of A-Z a-z 0-9 _ . -, got {split!r:.80}")
        if task == "regression":
            yt: NDArray[Any] = _floats(y_true, "y_true")
            yp: NDArray[Any] = _floats(y_pred, "y_pred")
        else:
            limit = 2 if task == "binary" else self.max_classes
            yt, yp = _labels(y_true, "y_true", limit), _labels(y_pred, "y_pred", limit)
        if len(yt) != len(yp):
            raise ValueError(f"y_true has {len(yt)} items but y_pred has {len(yp)}")
        self._queue.put(("prediction", None, (task, split, yt, yp), None, _now()))

    def cv_fold(self, fold: int, train_loss: Any, val_loss: Any) -> None:
        """Final losses of cross-validation fold ``fold`` (>= 0)."""
        if not self._on:
            self._ignored += 1
            return
        payload = (
            _index(fold, "fold"),
            _number(train_loss, "train_loss"),
            _number(val_loss, "val_loss"),
        )
        self._queue.put(("cv_fold", None, payload, None, _now()))

    def attention(self, weights: Any) -> None:
        """Attention weights (>= 0) of one layer: heads x positions, or one flat row."""
        if not self._on:
            self._ignored += 1
            return
        w = _floats(weights, "weights", nonnegative=True, ndims=(1, 2))
        self._queue.put(("attention", None, w, None, _now()))

    def features(self, values: Any) -> None:
        """One feature vector, or a 2-D array of vectors of equal length."""
        if not self._on:
            self._ignored += 1
            return
        v = _floats(values, "values", ndims=(1, 2))
        self._queue.put(("features", None, v, None, _now()))

    def stats(self) -> dict[str, Any]:
        """The counters (see the module doc); safe to call from any thread, at any time."""
        q, w = self._queue, self._worker
        depth = len(q)
        sent = w.sent if w else 0
        errors = w.delivery_errors if w else 0
        return {
            "enqueued": q.accepted,
            "sent": sent,
            "dropped": q.dropped,
            "delivery_errors": errors,
            "queue_depth": depth,
            "in_flight": max(q.accepted - q.settled - depth, 0),
            "records_sent": w.records_sent if w else 0,
            "heartbeats": w.heartbeats if w else 0,
            "connect_errors": w.connect_errors if w else 0,
            "connected": bool(w and w.connected),
            "ignored": self._ignored,
            "enabled": self.enabled,
            "forked": self._forked,
            "closed": self._closed,
        }

    # ------------------------------------------------------------------ lifecycle (sync core)
    def _active(self) -> bool:
        return self._worker is not None and not self._forked and os.getpid() == self._pid

    def _flush(self, timeout: float | None) -> bool:
        if not self._active() or self._closed:
            return self._queue.settled >= self._queue.accepted
        assert self._worker is not None
        target = self._queue.accepted
        self._worker.wake()
        return self._queue.wait_settled(target, timeout)

    def _close(self, status: str, timeout: float, run_end: bool | None = None) -> bool:
        if type(status) is not str or not status:
            raise ValueError(f"status must be a non-empty string, got {status!r}")
        if self._closed or not self._active():
            self._closed = True
            return self._queue.settled >= self._queue.accepted
        assert self._worker is not None
        deadline = time.monotonic() + timeout
        if run_end if run_end is not None else self.rank in (None, 0):
            self._queue.put(("run_end", None, status, None, _now()))
        ok = self._flush(timeout)
        self._closed = True
        self._queue.close()
        self._worker.stop(max(deadline - time.monotonic(), 0.1))
        _LIVE.discard(self)
        return ok

    def _disable_after_fork(self) -> None:
        self._on = False
        self._forked = True
        self._worker = None  # the thread did not survive the fork
        self._queue.reset_after_fork()

    def _flush_at_exit(self) -> None:
        if self._active() and not self._closed:
            self._flush(self.atexit_timeout)


class Emitter(_Base):
    """The synchronous emitter; see the module docstring for the contract of every call.

    ``Emitter(run_id=None, *, bootstrap_servers=None, topic=None, security=None, rank=None,
    world_size=None, enabled=None, queue_size=100_000, policy="drop_oldest", linger=0.5,
    heartbeat_interval=10.0, atexit_timeout=5.0, max_classes=1000, producer_options=None,
    sender=None)``. ``producer_options`` are passed to ``metricsd.kafka.producer``; ``sender``
    replaces Kafka altogether (tests).
    """

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait (at most ``timeout`` s) until everything queued so far is delivered or failed."""
        return self._flush(timeout)

    def close(
        self, status: str = "completed", timeout: float = 10.0, *, run_end: bool | None = None
    ) -> bool:
        """Send ``run_end`` with ``status``, flush, stop the thread; idempotent. ``run_end``
        None: sent only by rank 0 or an emitter without a rank (see the module docstring)."""
        return self._close(status, timeout, run_end)

    def __enter__(self) -> Emitter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close("completed" if kind is None else "failed")


class AsyncEmitter(_Base):
    """The emitter for asyncio code: the same calls (plain, non-blocking), ``await flush()``,
    ``await close()``, ``async with``. ``policy="block"`` is refused: it would block the loop."""

    def __init__(self, run_id: str | None = None, **kwargs: Any) -> None:
        if kwargs.get("policy", "drop_oldest") == "block":
            raise ConfigError("AsyncEmitter does not take policy='block' (it would block the loop)")
        super().__init__(run_id, **kwargs)

    async def flush(self, timeout: float | None = 10.0) -> bool:
        return await self._off_loop(lambda: self._flush(timeout))

    async def close(
        self, status: str = "completed", timeout: float = 10.0, *, run_end: bool | None = None
    ) -> bool:
        return await self._off_loop(lambda: self._close(status, timeout, run_end))

    @staticmethod
    def _off_loop(fn: Callable[[], bool]) -> Awaitable[bool]:
        return asyncio.get_running_loop().run_in_executor(None, fn)

    async def __aenter__(self) -> AsyncEmitter:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close("completed" if kind is None else "failed")
