"""The metrics themselves. Imported only once metrics are on: this module imports prometheus_client.

Every value lives in prometheus_client's per-process mmap'd files, so an update is a store
into memory (a lock and a getpid(), no I/O), and a forked child starts from its own files.

- Each field of serverhooks.counters.Counters is a counter `serverhooks_<field>_total`, labelled
  by database alias (alias="" where no single database applies: `errors`, caches closed).
- Each pool (gevent, ASGI) reports live gauges by alias: `serverhooks_pool_size`, `_in_use`,
  `_idle`, `_waiting`, all in "livesum" mode (the sum over running processes, so a dead
  worker stops counting once its files go), and the histogram
  `serverhooks_pool_checkout_wait_seconds` of the checkouts that had to wait.
- `_in_use` and `_idle` change twice per request, and each write costs about 1.5 µs (a lock, a
  getpid(), a store): so the request path writes nothing, and a background thread of the
  worker (a greenlet under gevent) samples its pools every SAMPLE_SECONDS, far below any
  scrape interval, writing only what changed.
- `serverhooks_processes` (livesum): 1 per running worker, to divide by.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from typing import Any, ClassVar

from prometheus_client import Counter, Gauge, Histogram, values

from serverhooks._log import say_once
from serverhooks._process import Counters, state

__all__ = ["HELP", "Meter", "MeteredCounters"]

#: HELP text of each mirrored counter (a unit test keeps this equal to Counters' fields).
HELP: dict[str, str] = {
    "closed_before_fork": "Connections closed cleanly in a parent right before it forked.",
    "caches_closed_before_fork": "Django cache clients closed in a parent right before it forked.",
    "abandoned_after_fork": "Inherited connections made unusable in a child without a byte sent.",
    "pools_abandoned_after_fork": "Django PostgreSQL pools dropped in a child.",
    "closed_at_exit": "Connections closed cleanly when the process exited.",
    "pool_opened": "Sessions opened by serverhooks' pool (gevent, ASGI).",
    "pool_reused": "Pool checkouts served by an already open session.",
    "pool_discarded": "Pooled sessions closed as expired, broken, or left inside a transaction.",
    "pool_reclaimed": "Pooled connections recovered from units of work that died holding them.",
    "pool_waits": "Pool checkouts that had to wait for a free connection.",
    "pool_wait_seconds": "Seconds pool checkouts spent waiting.",
    "closed_interrupted": "Connections closed because a query on them was cut short.",
    "closed_unhealthy": "Idle sessions the server had ended, closed before a request used them.",
    "busy_at_exit": "Connections left open at exit because another thread was inside a query or a transaction.",
    "errors": "Close attempts (and hooks) that failed and were logged instead of raised.",
    "sessions_opened": "Database sessions opened (Django's connection_created), pooled or not.",
}
SAMPLE_SECONDS = 1.0
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class MeteredCounters(Counters):
    """Counters whose increments also reach their Prometheus counters.

    serverhooks' code keeps writing `counters.add(name, alias)` (alias "" where none applies; a
    plain `counters.x += 1` is mirrored too, but is not exact under threads); only this class
    knows about metrics. add() stays the base class's, under its lock, then increments the child."""

    mirror: ClassVar[dict[str, Any]] = {}
    #: The labelled child of each (counter, alias), resolved once: an increment is one dict lookup more.
    children: ClassVar[dict[tuple[str, str], Any]] = {}

    @classmethod
    def child(cls, name: str, alias: str) -> Any:
        found = cls.children.get((name, alias))
        if found is None:
            found = cls.children[(name, alias)] = cls.mirror[name].labels(alias)
        return found

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.mirror:
            delta = value - self.__dict__.get(name, value)
            if delta > 0:  # counters only go up; a reset (never done) would be ignored
                self.child(name, "").inc(delta)
        object.__setattr__(self, name, value)

    def add(self, name: str, alias: str, amount: float = 1) -> None:
        super().add(name, alias, amount)
        if amount > 0 and name in self.mirror:
            self.child(name, alias).inc(amount)


@dataclasses.dataclass
class _AliasMeters:
    """One alias's pool metrics, its label resolved once (no label lookup per request)."""

    size: Any
    in_use: Any
    idle: Any
    waiting: Any
    waits: Any


class Meter:
    """This process tree's metric objects; `attach()` makes them count for the current process."""

    def __init__(self) -> None:
        self.counters = {
            name: Counter(f"serverhooks_{name}", HELP[name], ["alias"], registry=None)
            for name in (field.name for field in dataclasses.fields(Counters))
            if name in HELP
        }
        self.processes = Gauge(
            "serverhooks_processes", "Running processes (workers) that serverhooks prepared.",
            multiprocess_mode="livesum", registry=None,
        )  # fmt: skip
        self._pool_size = self._pool_gauge("size", "Most connections the pools hold (POOL_SIZE per worker).")
        self._pool_in_use = self._pool_gauge("in_use", "Pooled connections checked out right now.")
        self._pool_idle = self._pool_gauge("idle", "Pooled connections idle in the pools right now.")
        self._pool_waiting = self._pool_gauge("waiting", "Units of work waiting for a pooled connection now.")
        self._pool_waits = Histogram(
            "serverhooks_pool_checkout_wait_seconds", "Seconds each waiting pool checkout waited.", ["alias"],
            buckets=WAIT_BUCKETS, registry=None,
        )  # fmt: skip
        self._aliases: dict[str, _AliasMeters] = {}
        self._attached_pid: int | None = None
        self._pools: weakref.WeakSet[Any] = weakref.WeakSet()  # this worker's pools, sampled
        self._written: dict[str, tuple[int, int]] = {}  # (in_use, idle) last written, per alias
        self._sampler_pid: int | None = None
        MeteredCounters.mirror = self.counters
        MeteredCounters.children = {}

    @staticmethod
    def _pool_gauge(name: str, documentation: str) -> Gauge:
        return Gauge(f"serverhooks_pool_{name}", documentation, ["alias"], multiprocess_mode="livesum", registry=None)

    @classmethod
    def create(cls) -> Meter | None:
        """A meter, or None (and one WARNING) where prometheus_client is not in multiprocess mode."""
        if not getattr(values.ValueClass, "_multiprocess", False):
            say_once(
                "metrics-not-multiprocess",
                logging.WARNING,
                "serverhooks: no metrics: prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was "
                "set, so its values are not shared between processes. Set PROMETHEUS_MULTIPROC_DIR in the "
                "server's environment before it starts. The server keeps serving.",
            )
            return None
        return cls()

    # ------------------------------------------------------------------ per process

    def attach(self, *, worker: bool) -> None:
        """Count for this process: mirror its counters (what they hold already, too), and in a
        worker report its pools and itself. Idempotent per process."""
        current = state()
        if not isinstance(current.counters, MeteredCounters):
            current.counters = _metered_copy(current.counters)
        if self._attached_pid == os.getpid() or not worker:
            return
        self._attached_pid = os.getpid()
        self._written = {}  # a forked child's values start at zero
        self._pools = weakref.WeakSet()  # a parent's pools are not this worker's
        self.processes.set(1)
        # Label values created now, not on the request path (a new key may grow the file), and
        # every counter of every alias shows from the start (0, rather than an absent series).
        for alias in _configured_aliases():
            for name in self.counters:
                MeteredCounters.child(name, alias)
        from serverhooks.pool import active

        for pool in active.pools():
            self.pool_created(pool)

    def _start_sampler(self) -> None:
        """The worker's gauge writer, once per process, and only where a pool exists (after any
        gevent patching: attach() runs once the worker is ready, so under gevent it is a greenlet)."""
        if self._sampler_pid == os.getpid() or self._attached_pid != os.getpid():
            return
        self._sampler_pid = os.getpid()
        import threading

        threading.Thread(target=self._sample_forever, name="serverhooks-metrics", daemon=True).start()

    def _sample_forever(self) -> None:
        import time

        pid = os.getpid()
        while pid == os.getpid():  # a forked child does not inherit the thread; stop if it ever runs there
            time.sleep(SAMPLE_SECONDS)
            try:
                self.flush()
            except Exception:  # a metric must never take the worker down; the next round retries
                pass

    def flush(self) -> None:
        """Write the in_use and idle gauges of each alias whose pools changed since the last flush."""
        totals = dict.fromkeys(self._aliases, (0, 0))  # a pool that is gone counts for nothing
        for pool in list(self._pools):
            in_use, idle = pool.occupancy()
            before = totals.get(pool.alias, (0, 0))
            totals[pool.alias] = (before[0] + in_use, before[1] + idle)
        for alias, value in totals.items():
            if self._written.get(alias) != value:
                meters = self._alias(alias)
                meters.in_use.set(value[0])
                meters.idle.set(value[1])
                self._written[alias] = value

    def _alias(self, alias: str) -> _AliasMeters:
        meters = self._aliases.get(alias)
        if meters is None:
            meters = self._aliases[alias] = _AliasMeters(
                size=self._pool_size.labels(alias),
                in_use=self._pool_in_use.labels(alias),
                idle=self._pool_idle.labels(alias),
                waiting=self._pool_waiting.labels(alias),
                waits=self._pool_waits.labels(alias),
            )
        return meters

    # ------------------------------------------------------------------ events

    def pool_created(self, pool: Any) -> None:
        self._alias(pool.alias).size.set(pool.size)
        self._pools.add(pool)
        self.flush()
        self._start_sampler()

    def waiting(self, pool: Any) -> None:
        self._alias(pool.alias).waiting.inc()

    def waited(self, pool: Any, seconds: float) -> None:
        meters = self._alias(pool.alias)
        meters.waiting.dec()
        meters.waits.observe(seconds)


def _metered_copy(plain: Counters) -> MeteredCounters:
    """`plain`'s counts, now metered: what it counted already reaches the metrics once, by alias."""
    metered = MeteredCounters(**dataclasses.asdict(plain))
    object.__setattr__(metered, "by_alias", dict(plain.by_alias))
    for name in MeteredCounters.mirror:
        by_alias = {alias: value for (counted, alias), value in plain.by_alias.items() if counted == name}
        # What plain `+=` counted has no alias: it joins alias "" (which add() may have used too).
        by_alias[""] = by_alias.get("", 0) + getattr(plain, name) - sum(by_alias.values())
        for alias, value in by_alias.items():
            if value > 0:
                MeteredCounters.child(name, alias).inc(value)
    return metered


def _configured_aliases() -> list[str]:
    """The database aliases of loaded Django settings; none before they are (a master without the app)."""
    import sys

    django_conf = sys.modules.get("django.conf")
    try:
        if django_conf is not None and django_conf.settings.configured:
            return list(getattr(django_conf.settings, "DATABASES", {}))
    except Exception:  # broken settings: conf already said so
        pass
    return []
