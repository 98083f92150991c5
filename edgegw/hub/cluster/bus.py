"""The cluster bus: what crosses hub nodes over Redis, all of it rebuildable (docs/cluster.md,
"Redis").

Redis holds nothing durable here: PostgreSQL is the truth.  What Redis carries, and why each
piece survives the loss of Redis (a restart with an empty keyspace):

* **The live epoch** ``{prefix}:epoch``: a random value created ``SET NX`` by whichever node
  needs it first.  Every live offset is meaningful only within it.  Each node re-reads it
  every ``check_interval_s``; a different or missing value means Redis lost its data, so
  every node starts its channels afresh and clients get ``resync: epoch_changed`` -- the
  live protocol's own answer to "your offsets mean nothing now".
* **Topic streams** ``{prefix}:s:{topic}``: one entry per publication by the topic's owner
  (``TopicPublisher``), entry id ``0-<offset>`` where ``offset`` is the last of the ``n``
  consecutive offsets the entry covers.  Head offsets live in the hash ``{prefix}:heads``
  (kept for topics that went away, so a topic that comes back continues past its old
  offsets within the epoch).  The append, the head, the snapshot, the trim and the Pub/Sub
  wake-up are one Lua script: a reader never sees a stream entry without its head, and
  two publishers can never hand out one offset twice.
* **Snapshots** ``{prefix}:snap:{topic}`` = ``{offset, data}``; the stream is trimmed to
  about ``history`` entries but never past the snapshot, so snapshot + the stream after it
  always rebuild the topic.
* **Pub/Sub** ``{prefix}:live``: the same entries pushed to every node at once, so the
  mirrors (``edgegw.hub.cluster.mirror``) follow without polling; a node that misses some
  (a reconnect) fills the gap from the stream by offset -- correctness never rests on
  Pub/Sub delivery.  ``{prefix}:part`` carries "partition p advanced" wake-ups and
  ``{prefix}:notice`` small cross-node notices (a gateway taken over elsewhere).
* **Presence**: ``{prefix}:presence:{gateway}`` hashes with a TTL, and the sorted set
  ``{prefix}:nodes`` (score = expiry in ms) of live nodes.
* **Leases** ``{prefix}:lease:{name}`` = ``<node>:<token>`` with a TTL, the token from
  ``INCR {prefix}:fence:{name}``: strictly increasing per name, so a write fenced by a
  token (PostgreSQL keeps the highest one seen) refuses a stale holder.  Redis may lose the
  counters; ``seed_fence`` puts them back above what PostgreSQL saw.

**Health.**  The bus knows when it has not had a successful round trip for
``stale_after_s``: it is then *stale* -- this node must stop serving live data (the mirror
marks the fan-out unavailable and clients are told ``cluster_unavailable``), and every lease
counts as lost locally (a holder may not act on a lease it cannot renew).  When Redis
answers again the bus checks the epoch and its listeners resync.

Nothing here blocks the Trio thread: coredis is Trio-native (anyio).  Every command runs
with a deadline so that a Redis that stopped answering (a cut link, no RST) is noticed in
``stale_after_s`` rather than at TCP's keepalive timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio

from ...backoff import Backoff
from ...metrics import Metrics

if TYPE_CHECKING:  # coredis is an optional dependency (the ``cluster`` extra)
    import coredis

log = logging.getLogger("edgegw.hub.cluster.bus")


class EpochChanged(Exception):
    """A publication was refused: the live epoch is not the one the publisher knew."""


class BusUnavailable(Exception):
    """Redis did not answer (in time)."""


# A batch of publications, one script call for many topics (per-command overhead, in the
# client and in Redis, is most of the cost of a small entry): for each entry, append it
# covering ``n`` offsets, move the head, maybe write the snapshot, trim, and wake every node
# -- atomically, and only within the caller's epoch.
# KEYS: epoch, heads, topics, then per entry: stream, snap.
# ARGV: epoch, history, channel, gone_ttl_ms, count, then per entry: topic, n, kind,
# payload, snapshot ('' for none).
#   kind 'd': payload = cbor [deltas, ts_min, ts_max];  's': payload = the snapshot (cbor),
#   a reset: the topic's state *is* this from here on;  'x': the topic went away.
#   n = 0: no entry, only a snapshot write at the current head.
# Pub/Sub: the entry goes to the topic's own channel ``{prefix}:live:{topic}`` (only the
# nodes whose clients follow the topic subscribe to it: Redis delivers each entry to them,
# not to every node); a topic's start ('s') or end ('x') also goes, without its payload, to
# the catalogue channel ``{prefix}:live`` that every node follows (new topics are rare).
# Trim: keep about ``history`` entries, never those after the snapshot (MINID ~ removes whole
# stream nodes only, so it is cheap).
_PUBLISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('EPOCH changed') end
local history = tonumber(ARGV[2])
local count = tonumber(ARGV[5])
local heads = {}
for i = 1, count do
  local a = 5 + (i - 1) * 5
  local topic, n, kind = ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3]
  local payload, snapshot = ARGV[a + 4], ARGV[a + 5]
  local stream, snap = KEYS[2 + i * 2], KEYS[3 + i * 2]
  local head
  if n > 0 then
    head = redis.call('HINCRBY', KEYS[2], topic, n)
    redis.call('XADD', stream, '0-' .. head, 'n', n, 'k', kind, 'p', payload)
    local header = ARGV[1] .. ' ' .. head .. ' ' .. n .. ' ' .. kind .. ' ' .. #topic .. ' '
                   .. topic
    redis.call('PUBLISH', ARGV[3] .. ':' .. topic, header .. payload)
    if kind ~= 'd' then redis.call('PUBLISH', ARGV[3], header) end
  else
    head = tonumber(redis.call('HGET', KEYS[2], topic) or '0')
  end
  if kind == 'x' then
    redis.call('SREM', KEYS[3], topic)
    redis.call('DEL', snap)
    redis.call('PEXPIRE', stream, ARGV[4])
  else
    if n > 0 then
      redis.call('SADD', KEYS[3], topic)
      redis.call('PERSIST', stream)
    end
    if snapshot ~= '' then redis.call('HSET', snap, 'offset', head, 'data', snapshot) end
    local snapoff = tonumber(redis.call('HGET', snap, 'offset') or '0')
    local minid = math.min(head - history, snapoff)
    if minid > 0 then redis.call('XTRIM', stream, 'MINID', '~', '0-' .. (minid + 1)) end
  end
  heads[i] = head
end
return heads
"""

#: entries per script call: bounds how long one call holds Redis (it runs nothing else)
PUBLISH_BATCH = 256

_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
return token
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_SEED = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) return 1 end
return 0
"""


@dataclasses.dataclass(frozen=True)
class StreamEntry:
    """One stream entry: it covers offsets ``last - n + 1 .. last`` of its topic."""

    last: int
    n: int
    kind: str  # 'd' deltas, 's' reset to a snapshot, 'x' the topic went away
    payload: bytes

    @property
    def first(self) -> int:
        return self.last - self.n + 1


def parse_live_message(data: bytes) -> tuple[str, str, StreamEntry]:
    """A ``{prefix}:live:{topic}`` Pub/Sub message (built by the publish script; on the
    catalogue channel ``{prefix}:live`` the same without the payload):
    ``<epoch> <last> <n> <kind> <len(topic)> <topic><payload>`` -> (epoch, topic, entry)."""
    epoch, last, n, kind, size, rest = data.split(b" ", 5)
    length = int(size)
    topic = rest[:length].decode()
    return (epoch.decode(), topic,
            StreamEntry(int(last), int(n), kind.decode(), bytes(rest[length:])))


@dataclasses.dataclass
class _Held:
    token: int
    valid_until: float  # trio clock: the local bound, from *before* the request was sent


def _leaf_cancelled(group: BaseExceptionGroup[Any]) -> trio.Cancelled | None:
    for exc in group.exceptions:
        if isinstance(exc, trio.Cancelled):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _leaf_cancelled(exc)
            if found is not None:
                return found
    return None


@contextlib.contextmanager
def _cancel_wins() -> Iterator[None]:
    """coredis (anyio) may fail in its own cleanup while being cancelled (a write to a
    connection it already closed): when we are being cancelled, that is noise -- the
    cancellation is what propagates."""
    try:
        yield
    except BaseExceptionGroup as group:
        cancelled = _leaf_cancelled(group)
        if cancelled is None:
            raise
        raise cancelled from None


def _new_epoch() -> str:
    return f"{int(time.time()):x}-{secrets.token_hex(4)}"


Handler = Callable[[bytes], None]


class ClusterBus:
    """One node's connection to the cluster's Redis.  Start with ``nursery.start(bus.run)``:
    it returns once Redis answered and the epoch is known (``epoch``)."""

    def __init__(
        self,
        redis_url: str,
        prefix: str,
        node_id: str,
        *,
        stale_after_s: float = 3.0,
        check_interval_s: float | None = None,
        history: int = 1024,
        gone_ttl_s: float = 3600.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.node_id = node_id
        self.stale_after_s = stale_after_s
        # Several checks per stale period, so one slow answer never makes a node stale.
        self.check_interval_s = check_interval_s or min(1.0, stale_after_s / 4)
        self.history = history
        self.gone_ttl_ms = int(gone_ttl_s * 1000)
        self.metrics = metrics or Metrics()
        self.epoch: str | None = None
        self.stale = True  # until the first round trip
        self.stale_reason = "not connected yet"
        self.last_ok: float | None = None  # trio clock of the last successful round trip
        self.since: float = 0.0  # trio clock of the last change of ``stale``
        # Bumped whenever the bus (re)gains Redis or the epoch changes: listeners resync.
        self.generation = 0
        self.changed = trio.Event()  # set (and replaced) on every change of state
        self._client: coredis.Redis[bytes] | None = None
        self._scripts: dict[str, Any] = {}
        self._handlers: dict[str, list[Handler]] = {}
        self._held: dict[str, _Held] = {}
        self._subscriber_ok = False
        self._ever_ok = False
        # Topic channels followed (``follow_topics``), or all of them by pattern.
        self._topic_channels: set[str] = set()
        self._follow_all = False
        self._pubsub: Any = None  # the live subscription, while it is up
        self._patterned: Any = None  # the subscription that has the all-topics pattern
        self._live_subs: set[str] = set()  # topics the current subscription has
        self._m_stale = self.metrics.gauge(
            "cluster_redis_stale", "1 while this node has no working Redis (no live data)")
        self._m_epoch_changes = self.metrics.counter(
            "cluster_epoch_changes_total", "live epoch changes seen (Redis lost its data)")
        self._m_errors = self.metrics.counter("cluster_redis_errors_total",
                                              "Redis commands that failed, by operation")
        self._m_published = self.metrics.counter("cluster_published_entries_total",
                                                 "topic stream entries this node published")
        self._m_stale.set(1)

    # ------------------------------------------------------------------ keys

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def live_channel(self) -> str:
        return self.key("live")

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        import coredis  # lazily: the base install runs without the cluster extra

        url = urlsplit(self.redis_url)
        db = int(url.path.lstrip("/") or 0)
        # A command that gets no answer in half the stale period has failed: the health
        # check retries well within the period.
        timeout = max(0.2, self.stale_after_s / 2)
        client: coredis.Redis[bytes] = coredis.Redis(
            host=url.hostname or "127.0.0.1", port=url.port or 6379, db=db,
            username=url.username, password=url.password,
            stream_timeout=timeout, connect_timeout=timeout,
            # The bus retries at its own pace (health loop, publisher): a command fails fast.
            retry_policy=coredis.retry.NoRetryPolicy(),
        )
        with _cancel_wins():
            await self._serve(client, task_status)

    async def _serve(self, client: coredis.Redis[bytes], task_status: trio.TaskStatus[None],
                     ) -> None:
        async with client:
            self._client = client
            for name, body in (("publish", _PUBLISH), ("acquire", _ACQUIRE),
                               ("renew", _RENEW), ("release", _RELEASE), ("seed", _SEED)):
                self._scripts[name] = client.register_script(body)
            backoff = Backoff(0.1, 2.0)
            while True:  # the first round trip: wait for Redis
                if await self.check():
                    break
                await trio.sleep(backoff.next_delay())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._health_loop)
                nursery.start_soon(self._watchdog)
                nursery.start_soon(self._subscriber)
                while self.stale:  # ready once the Pub/Sub subscription is up too
                    await self.wait_changed()
                task_status.started()

    async def _call(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """One Redis round trip with a deadline; a success proves Redis is reachable."""
        deadline = max(0.2, self.stale_after_s / 2)
        try:
            with trio.fail_after(deadline):
                result = await fn()
        except trio.TooSlowError:
            self._m_errors.inc(op=what)
            raise BusUnavailable(f"{what}: no answer from Redis in {deadline} s") from None
        except Exception as exc:
            import coredis.exceptions as cx

            if isinstance(exc, cx.ResponseError) and "EPOCH" in str(exc):
                self._ok()
                raise EpochChanged(str(exc)) from None
            if isinstance(exc, (cx.ConnectionError, TimeoutError, OSError)):
                self._m_errors.inc(op=what)
                raise BusUnavailable(f"{what}: {exc}") from exc
            raise
        self._ok()
        return result

    def _ok(self) -> None:
        self.last_ok = trio.current_time()
        if self.stale and self._subscriber_ok:
            self._set_stale(False, "")

    def _set_stale(self, stale: bool, reason: str) -> None:
        if stale == self.stale:
            return
        self.stale = stale
        self.stale_reason = reason
        self.since = trio.current_time()
        self._m_stale.set(1 if stale else 0)
        if stale:
            log.error("cluster: lost Redis (%s): this node stops serving live data and "
                      "holds no lease until it is back", reason)
            self._held.clear()
        else:
            if self._ever_ok:
                log.warning("cluster: Redis reachable again (epoch %s): resyncing", self.epoch)
            else:
                log.info("cluster: connected to Redis (epoch %s)", self.epoch)
            self._ever_ok = True
            self.generation += 1
        self._signal()

    def _signal(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def check(self) -> bool:
        """One health round trip: read (create if missing) the epoch.  True when it worked."""
        import coredis

        assert self._client is not None
        client = self._client
        key = self.key("epoch")
        try:
            value = await self._call("epoch", lambda: client.get(key))
            if value is None:
                # Redis lost its data (or this is the cluster's first start): a new epoch.
                # SET NX: one value wins when several nodes race.
                candidate = _new_epoch()
                await self._call("epoch", lambda: client.set(key, candidate, condition=
                                                             coredis.PureToken.NX))
                value = await self._call("epoch", lambda: client.get(key))
        except BusUnavailable as exc:
            if self.last_ok is None or trio.current_time() - self.last_ok >= self.stale_after_s:
                self._set_stale(True, str(exc))
            return False
        epoch = value.decode() if isinstance(value, bytes) else str(value)
        if epoch != self.epoch:
            if self.epoch is not None:
                log.warning("cluster: live epoch changed %s -> %s (Redis lost its data): "
                            "live clients resync", self.epoch, epoch)
                self._m_epoch_changes.inc()
                # Leases went with the data: none is held any more.
                self._held.clear()
            self.epoch = epoch
            self.generation += 1
            self._signal()
        return True

    async def _health_loop(self) -> None:
        while True:
            await trio.sleep(self.check_interval_s)
            await self.check()

    async def _watchdog(self) -> None:
        """Stale exactly ``stale_after_s`` after the last successful round trip, whatever
        the commands in flight are doing (a cut link makes them hang, not fail)."""
        while True:
            if not self.stale and self.last_ok is not None:
                deadline = self.last_ok + self.stale_after_s
                if trio.current_time() < deadline:
                    await trio.sleep_until(deadline)
                    continue
                self._set_stale(True, f"no answer from Redis for {self.stale_after_s} s")
            await trio.sleep(self.check_interval_s / 2)

    async def _subscriber(self) -> None:
        """The node's one Pub/Sub connection; dispatches by channel.  It is reopened (and
        listeners resync through ``generation``) whenever it fails or the bus goes stale --
        messages sent meanwhile are lost, which is why every listener can catch up."""
        import coredis.exceptions as cx

        assert self._client is not None
        backoff = Backoff(0.1, 2.0)
        fixed = [self.key(name) for name in ("live", "part", "notice")]
        topic_prefix = self.live_channel + ":"
        while True:
            try:
                topics = set(self._topic_channels)
                channels = [*fixed, *(topic_prefix + t for t in topics)]
                patterns = [topic_prefix + "*"] if self._follow_all else None
                with _cancel_wins(), trio.CancelScope() as scope:
                    async with self._client.pubsub(channels=channels, patterns=patterns,
                                                   retry_policy=None,
                                                   ignore_subscribe_messages=True,
                                                   max_idle_seconds=self.check_interval_s,
                                                   ) as pubsub:
                        self._pubsub = pubsub
                        self._live_subs = topics
                        if patterns:
                            self._patterned = pubsub
                        self._subscriber_ok = True
                        if self.last_ok is not None and (
                                trio.current_time() - self.last_ok < self.stale_after_s):
                            self._set_stale(False, "")
                        # Listeners resync after every reconnect of the subscription.
                        self.generation += 1
                        self._signal()
                        backoff.reset()
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._cancel_when_stale, scope)
                            async for message in pubsub:
                                if message["type"] not in ("message", "pmessage"):
                                    continue
                                channel = message["channel"]
                                channel = (channel.decode() if isinstance(channel, bytes)
                                           else channel)
                                # a topic's entries -> "live"; the catalogue -> "catalogue"
                                name = ("live" if channel.startswith(topic_prefix)
                                        else "catalogue" if channel == self.live_channel
                                        else channel.rsplit(":", 1)[-1])
                                data = message["data"]
                                for handler in self._handlers.get(name, ()):
                                    handler(data if isinstance(data, bytes)
                                            else str(data).encode())
            except (cx.ConnectionError, TimeoutError, OSError, trio.TooSlowError,
                    cx.RedisError) as exc:
                log.debug("cluster: Pub/Sub connection lost: %s", exc)
            except Exception:  # anyio may wrap errors in groups: log and reconnect
                log.debug("cluster: Pub/Sub connection failed", exc_info=True)
            self._pubsub = None
            self._subscriber_ok = False
            await trio.sleep(backoff.next_delay())
            # Cut off: reconnect once the health checks get through again.
            while True:
                if self.last_ok is not None and (
                        trio.current_time() - self.last_ok < self.stale_after_s):
                    break
                await trio.sleep(self.check_interval_s / 2)

    async def follow_all(self) -> None:
        """Receive every topic's entries (one pattern subscription): a node that mirrors
        everything.  Otherwise only ``follow_topics``'s.  Returns once Redis confirmed it
        (or the subscription is down: it is made when it reopens)."""
        self._follow_all = True
        pubsub = self._pubsub
        if pubsub is None or self._patterned is pubsub:
            return
        try:
            with trio.fail_after(max(0.5, self.stale_after_s)):
                await pubsub.psubscribe(self.live_channel + ":*")
        except (trio.TooSlowError, OSError, TimeoutError) as exc:
            raise BusUnavailable(f"psubscribe: {exc!r}") from None
        self._patterned = pubsub

    def followed_topics(self) -> list[str]:
        """The topics whose channels this node wants (``follow_topics``)."""
        return list(self._topic_channels)

    async def follow_topics(self, add: Sequence[str] = (), remove: Sequence[str] = ()) -> None:
        """Subscribe to (unsubscribe from) these topics' channels.  Returns once Redis
        confirmed the subscription, so an entry published after this returns is delivered
        (the caller reads the stream after it: nothing falls in between).  Kept across
        reconnections of the subscription."""
        prefix = self.live_channel + ":"
        self._topic_channels.update(add)
        self._topic_channels.difference_update(remove)
        pubsub = self._pubsub
        if pubsub is None or self._follow_all:
            return  # subscribed with the rest when the subscription (re)opens
        # against what *this* subscription has (a reopened one has what was wanted then)
        live = self._live_subs
        new = [t for t in dict.fromkeys(add) if t not in live]
        gone = [t for t in dict.fromkeys(remove) if t in live]
        try:
            with trio.fail_after(max(0.5, self.stale_after_s)):
                for i in range(0, len(new), 500):
                    await pubsub.subscribe(*(prefix + t for t in new[i:i + 500]))
                    live.update(new[i:i + 500])
                for i in range(0, len(gone), 500):
                    await pubsub.unsubscribe(*(prefix + t for t in gone[i:i + 500]))
                    live.difference_update(gone[i:i + 500])
        except (trio.TooSlowError, OSError, TimeoutError) as exc:
            raise BusUnavailable(f"subscribe: {exc!r}") from None
        except Exception as exc:
            import coredis.exceptions as cx

            if isinstance(exc, cx.RedisError):
                raise BusUnavailable(f"subscribe: {exc}") from exc
            raise

    async def _cancel_when_stale(self, scope: trio.CancelScope) -> None:
        while not self.stale:
            await self.wait_changed()
        scope.cancel()

    async def wait_changed(self) -> None:
        await self.changed.wait()

    # ------------------------------------------------------------------ health

    def health(self) -> dict[str, Any]:
        """For /healthz and /api/stats: ``ok`` False while stale."""
        now = trio.current_time()
        return {
            "ok": not self.stale,
            "redis": "stale" if self.stale else "ok",
            "reason": self.stale_reason or None,
            "epoch": self.epoch,
            "last_ok_s_ago": None if self.last_ok is None else round(now - self.last_ok, 2),
            "leases_held": len(self._held),
        }

    # ------------------------------------------------------------------ Pub/Sub handlers

    def on(self, name: str, handler: Handler) -> None:
        """Call ``handler(data)`` for every message on ``{prefix}:{name}`` (``live``,
        ``part``, ``notice``), in the bus's task: it must be quick (queue the work)."""
        self._handlers.setdefault(name, []).append(handler)

    def off(self, name: str, handler: Handler) -> None:
        handlers = self._handlers.get(name, [])
        if handler in handlers:
            handlers.remove(handler)

    def on_partition(self, handler: Callable[[int, int], None]) -> Handler:
        def parse(data: bytes) -> None:
            partition, pseq = data.split(b" ", 1)
            handler(int(partition), int(pseq))
        self.on("part", parse)
        return parse

    async def notify_partition(self, partition: int, pseq: int) -> None:
        """Best effort: wake the partition's owner (it also polls)."""
        await self.notify("part", f"{partition} {pseq}".encode())

    async def notify(self, name: str, data: bytes) -> None:
        """Best effort: a lost notice costs latency, never correctness."""
        assert self._client is not None
        client = self._client
        try:
            await self._call("notify", lambda: client.publish(self.key(name), data))
        except BusUnavailable as exc:
            log.debug("cluster: notice %s not sent: %s", name, exc)

    # ------------------------------------------------------------------ topic streams

    async def publish_entries(
        self, epoch: str, entries: Sequence[tuple[str, int, str, bytes, bytes | None]],
    ) -> list[int]:
        """Publish ``(topic, n, kind, payload, snapshot)`` entries in one pipeline; returns
        each one's head offset.  Raises ``EpochChanged`` when Redis's epoch is not
        ``epoch`` (nothing of the batch after the failing entry is applied) and
        ``BusUnavailable``."""
        assert self._client is not None
        script = self._scripts["publish"]
        client = self._client
        common_keys = [self.key("epoch"), self.key("heads"), self.key("topics")]
        common_args = [epoch, self.history, self.live_channel, self.gone_ttl_ms]

        def call(batch: Sequence[tuple[str, int, str, bytes, bytes | None]],
                 on: Any) -> Any:
            keys = list(common_keys)
            args: list[Any] = [*common_args, len(batch)]
            for topic, n, kind, payload, snapshot in batch:
                keys += [self.key("s", topic), self.key("snap", topic)]
                args += [topic, n, kind, payload, snapshot if snapshot is not None else b""]
            return script(keys=keys, args=args, client=on)

        async def run() -> list[int]:
            if len(entries) <= PUBLISH_BATCH:
                return [int(h) for h in await call(entries, None)]
            async with client.pipeline(transaction=False) as pipe:
                futures = [call(entries[i:i + PUBLISH_BATCH], pipe)
                           for i in range(0, len(entries), PUBLISH_BATCH)]
            return [int(h) for f in futures for h in await f]

        heads = await self._call("publish", run)
        self._m_published.inc(len(entries))
        return heads

    async def read_topic(self, topic: str, after: int = 0) -> list[StreamEntry]:
        """The topic's stream entries whose last offset is above ``after``."""
        assert self._client is not None
        client = self._client
        key = self.key("s", topic)
        start = f"(0-{after}" if after > 0 else "-"
        raw = await self._call("xrange", lambda: client.xrange(key, start, "+"))
        return [_entry(item) for item in raw]

    async def load_topics(
        self, topics: Sequence[str],
    ) -> list[tuple[int | None, bytes | None, list[StreamEntry], int]]:
        """For each topic: (snapshot offset, snapshot data, its whole stream, head)."""
        assert self._client is not None
        client = self._client

        async def run() -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                futures = [(pipe.hgetall(self.key("snap", t)), pipe.xrange(self.key("s", t)),
                            pipe.hget(self.key("heads"), t)) for t in topics]
            return [(await a, await b, await c) for a, b, c in futures]

        out: list[tuple[int | None, bytes | None, list[StreamEntry], int]] = []
        for snap, stream, head in await self._call("load", run):
            snap = {(k.decode() if isinstance(k, bytes) else k): v for k, v in snap.items()}
            offset = int(snap["offset"]) if "offset" in snap else None
            out.append((offset, snap.get("data"), [_entry(item) for item in stream],
                        int(head or 0)))
        return out

    async def live_topics(self) -> dict[str, int]:
        """Every topic that exists now, with its head offset."""
        assert self._client is not None
        client = self._client
        members = await self._call("topics", lambda: client.smembers(self.key("topics")))
        topics = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
        if not topics:
            return {}
        heads = await self._call("heads", lambda: client.hmget(self.key("heads"), topics))
        return {t: int(h or 0) for t, h in zip(topics, heads, strict=True)}

    # ------------------------------------------------------------------ presence

    async def set_presence(self, gateway_id: str, ttl_s: float, **fields: str) -> None:
        assert self._client is not None
        client = self._client
        key = self.key("presence", gateway_id)
        values = {"node": self.node_id, **fields}

        async def run() -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hset(key, values)
                pipe.pexpire(key, int(ttl_s * 1000))

        await self._call("presence", run)

    async def presence(self, gateway_id: str) -> dict[str, str] | None:
        assert self._client is not None
        client = self._client
        raw = await self._call("presence",
                               lambda: client.hgetall(self.key("presence", gateway_id)))
        if not raw:
            return None
        return {(k.decode() if isinstance(k, bytes) else k):
                (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}

    async def heartbeat_node(self, ttl_s: float) -> None:
        """This node is alive for ``ttl_s`` more seconds (``{prefix}:nodes``, a sorted set
        scored by expiry: listing live nodes needs no SCAN)."""
        assert self._client is not None
        client = self._client
        key = self.key("nodes")
        expiry = int((time.time() + ttl_s) * 1000)

        async def run() -> None:
            async with client.pipeline(transaction=False) as pipe:
                pipe.zadd(key, {self.node_id: expiry})
                pipe.zremrangebyscore(key, "-inf", int(time.time() * 1000))

        await self._call("nodes", run)

    async def live_nodes(self) -> list[str]:
        assert self._client is not None
        client = self._client
        now = int(time.time() * 1000)
        import coredis

        raw = await self._call("nodes", lambda: client.zrange(
            self.key("nodes"), now, "+inf", sortby=coredis.PureToken.BYSCORE))
        return sorted(m.decode() if isinstance(m, bytes) else m for m in raw)

    async def leave(self) -> None:
        """Graceful stop: drop this node from the live set at once."""
        assert self._client is not None
        client = self._client
        await self._call("nodes", lambda: client.zrem(self.key("nodes"), [self.node_id]))

    # ------------------------------------------------------------------ leases

    async def acquire(self, name: str, ttl_s: float) -> int | None:
        """Take the lease ``name`` for ``ttl_s`` if nobody holds it: its fencing token (one
        more than any token of this name before), or None."""
        if self.stale:
            return None
        started = trio.current_time()
        token = await self._call("acquire", lambda: self._scripts["acquire"](
            keys=[self.key("lease", name), self.key("fence", name)],
            args=[self.node_id, int(ttl_s * 1000)]))
        if token is None:
            return None
        token = int(token)
        self._held[name] = _Held(token, started + ttl_s)
        return token

    async def renew(self, name: str, token: int, ttl_s: float) -> bool:
        """Extend our lease (compare-and-pexpire); False: it is no longer ours."""
        if self.stale:
            self._held.pop(name, None)
            return False
        started = trio.current_time()
        ok = await self._call("renew", lambda: self._scripts["renew"](
            keys=[self.key("lease", name)],
            args=[f"{self.node_id}:{token}", int(ttl_s * 1000)]))
        if ok:
            self._held[name] = _Held(token, started + ttl_s)
            return True
        self._held.pop(name, None)
        return False

    async def release(self, name: str, token: int) -> bool:
        """Give the lease back (compare-and-delete: never someone else's)."""
        self._held.pop(name, None)
        ok = await self._call("release", lambda: self._scripts["release"](
            keys=[self.key("lease", name)], args=[f"{self.node_id}:{token}"]))
        return bool(ok)

    def holds(self, name: str) -> int | None:
        """The token of a lease this node may act on *now*, else None: only within the TTL
        counted from before the last acquire/renew was sent, and never while stale (the
        lease may have expired on Redis without us hearing)."""
        held = self._held.get(name)
        if held is None or self.stale or trio.current_time() >= held.valid_until:
            return None
        return held.token

    async def seed_fence(self, name: str, at_least: int) -> None:
        """Make the next token of ``name`` greater than ``at_least`` (after Redis lost its
        counters, from the highest token PostgreSQL has seen)."""
        await self._call("seed", lambda: self._scripts["seed"](
            keys=[self.key("fence", name)], args=[int(at_least)]))

    async def lease_holder(self, name: str) -> tuple[str, int] | None:
        assert self._client is not None
        client = self._client
        raw = await self._call("lease", lambda: client.get(self.key("lease", name)))
        if raw is None:
            return None
        node, _, token = (raw.decode() if isinstance(raw, bytes) else raw).rpartition(":")
        return node, int(token)

    # ---------------------------------------------------- presence by connection, replies
    # (added for the gateway topics and per-die values, docs/cluster.md "A node")

    _CLAIM_PRESENCE = """
local g = redis.call('HGET', KEYS[1], 'generation')
if g and tonumber(g) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
    _DROP_PRESENCE = """
if redis.call('HGET', KEYS[1], 'generation') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

    def _script(self, name: str, body: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            assert self._client is not None
            script = self._scripts[name] = self._client.register_script(body)
        return script

    async def claim_presence(self, gateway_id: str, generation: int, ttl_s: float,
                             **fields: str) -> bool:
        """``set_presence`` for the gateway's connection of ``generation``, unless a newer
        connection of it (anywhere) holds the presence: an old connection that lingers on
        one node never overwrites its successor's."""
        values = {"node": self.node_id, "generation": str(generation), **fields}
        flat = [x for kv in values.items() for x in kv]
        ok = await self._call("presence", lambda: self._script(
            "claim_presence", self._CLAIM_PRESENCE)(
            keys=[self.key("presence", gateway_id)],
            args=[generation, int(ttl_s * 1000), *flat]))
        return bool(ok)

    async def drop_presence(self, gateway_id: str, generation: int) -> bool:
        """The connection of ``generation`` ended: its presence goes at once (not after
        its TTL), unless a newer connection holds it (compare-and-delete)."""
        ok = await self._call("presence", lambda: self._script(
            "drop_presence", self._DROP_PRESENCE)(
            keys=[self.key("presence", gateway_id)], args=[str(generation)]))
        return bool(ok)

    async def put_reply(self, name: str, data: bytes, ttl_s: float) -> None:
        """Leave ``data`` for whoever asked (``take_reply``); it expires after ``ttl_s``."""
        assert self._client is not None
        client = self._client
        await self._call("reply", lambda: client.set(self.key("reply", name), data,
                                                      px=int(ttl_s * 1000)))

    async def take_reply(self, name: str) -> bytes | None:
        """The reply left under ``name`` (removed), or None."""
        assert self._client is not None
        client = self._client
        raw = await self._call("reply", lambda: client.getdel(self.key("reply", name)))
        return bytes(raw) if raw is not None else None


def _entry(item: Any) -> StreamEntry:
    entry_id, fields = item.identifier, item.field_values  # coredis's StreamEntry
    ident = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    values = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    kind = values["k"]
    return StreamEntry(int(ident.split("-", 1)[1]), int(values["n"]),
                       kind.decode() if isinstance(kind, bytes) else kind, bytes(values["p"]))


__all__ = ["BusUnavailable", "ClusterBus", "EpochChanged", "StreamEntry", "parse_live_message"]
