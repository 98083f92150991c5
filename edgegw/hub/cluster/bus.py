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
  Pub/Sub delivery.  ``{prefix}:part:<p>`` carries "partition p advanced" wake-ups (only
  p's owner subscribes) and ``{prefix}:notice`` small cross-node notices (a gateway taken
  over elsewhere).
* **Presence**: ``{prefix}:presence:{gateway}`` hashes with a TTL, and the sorted set
  ``{prefix}:nodes`` (score = expiry in ms by Redis's clock, ``TIME``: node clocks may
  disagree by hours) of live nodes.
* **Leases** ``{prefix}:lease:{name}`` = ``<node>:<token>`` with a TTL, the token from
  ``INCR {prefix}:fence:{name}``: strictly increasing per name, so a write fenced by a
  token (PostgreSQL keeps the highest one seen) refuses a stale holder.  Redis may lose the
  counters; ``seed_fence`` puts them back above what PostgreSQL saw.

**Shards.**  The bus may span several Redis instances (``redis_urls``): a partition's
keys (its lease and fence, wake-ups, the topics it owns, its gateways' presence) live on
shard ``partition % shards``, the cluster-wide ones (node registry, the ``alerts`` lease,
notices, topics no partition owns) on shard 0.  Each shard has its own epoch, health
checks and Pub/Sub connection, so one shard losing its data resyncs only its topics.
Each shard holds its identity ``{prefix}:shard`` = ``<shards id>/<index>`` (the id in
PostgreSQL): a starting node's store checks it (``read_shard_labels``, one GET per shard),
and a node puts it back when it sees a shard's data lost (its epoch changed).

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
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

import trio

from ...backoff import Backoff
from ...metrics import Metrics
from ...tls import client_context
from .partition import PartitionFenced

if TYPE_CHECKING:  # coredis is an optional dependency (the ``cluster`` extra)
    import coredis

log = logging.getLogger("edgegw.hub.cluster.bus")

T = TypeVar("T")


class EpochChanged(Exception):
    """A publication was refused: the live epoch is not the one the publisher knew."""


class BusUnavailable(Exception):
    """Redis did not answer (in time)."""


# A batch of publications, one script call for many topics (per-command overhead, in the
# client and in Redis, is most of the cost of a small entry): for each entry, append it
# covering ``n`` offsets, move the head, maybe write the snapshot, trim, and wake every node
# -- atomically, only within the caller's epoch, and (a partition owner's publisher) only
# while the caller holds its lease: an owner that wakes from a pause (SIGSTOP, a frozen VM)
# after its lease lapsed cannot publish before it has noticed ('LEASE lost').  The lease
# key lives on its own shard; a partition's topics on another shard (``sensor/...``) are
# fenced by the token instead: that shard keeps the newest token that published there
# (``{prefix}:pubfence:<lease>``) and refuses an older one, so a woken stale owner is
# refused there from its successor's takeover on (``raise_pubfences``; and in any case from
# its first publication there).
# KEYS: epoch, heads, topics, lease (or the shard's pubfence key), then per entry: stream,
# snap.
# ARGV: epoch, history, channel, gone_ttl_ms, lease value ('' for no lease check;
# '^<token>': the token fence), count, then per entry: topic, n, kind, payload, snapshot
# ('' for none).
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
if string.sub(ARGV[5], 1, 1) == '^' then
  local token = tonumber(string.sub(ARGV[5], 2))
  local newest = tonumber(redis.call('GET', KEYS[4]) or '0')
  if token < newest then return redis.error_reply('LEASE lost (a newer owner published)') end
  if token > newest then redis.call('SET', KEYS[4], token) end
elseif ARGV[5] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[5] then
  return redis.error_reply('LEASE lost')
end
local history = tonumber(ARGV[2])
local count = tonumber(ARGV[6])
local heads = {}
for i = 1, count do
  local a = 6 + (i - 1) * 5
  local topic, n, kind = ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3]
  local payload, snapshot = ARGV[a + 4], ARGV[a + 5]
  local stream, snap = KEYS[3 + i * 2], KEYS[4 + i * 2]
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

# The live-node registry ``{prefix}:nodes`` (score = expiry in ms) by one clock, Redis's
# ``TIME``: were each node to score (and cut off) by its own wall clock, a node whose clock
# runs ahead would stay listed that much longer after it died (nobody takes its partitions
# over) and would drop the live nodes from its own listing (it takes theirs); one running
# behind the reverse.  Lease TTLs and presence TTLs are Redis's own measure already.
# ``{prefix}:up`` is when the cluster last came up (ms, the same clock): set by a heartbeat
# that finds no other live node.  A gateway's outage is not timed from before it (no node
# was there to take its connection: owner.py).
# KEYS: nodes, up.  ARGV: node ('' for none: list only), ttl ms, '1' to return the live
# nodes.  (Writes after TIME are fine: Redis >= 5 replicates a script's effects.)
_NODES = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) == 0 or not redis.call('GET', KEYS[2]) then
    redis.call('SET', KEYS[2], now)
  end
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
end
-- (Redis's time is returned too: the node keeps it as its shared clock, ``ClusterBus.clock``)
local ts = {tonumber(t[1]), tonumber(t[2])}
local up = tonumber(redis.call('GET', KEYS[2]) or '-1')
if ARGV[3] == '' then return {ts, {}, up} end
return {ts, redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf'), up}
"""

#: how long a gateway's last-seen time (``{prefix}:seen:<gateway>``) is kept after it was
#: last written: longer than any ``offline_s`` worth alerting on
SEEN_KEEP_S = 7 * 86400.0

#: seconds per second the bound of a held ``ClusterBus.clock`` sample grows by: clocks
#: drift (ppm) and Redis's may be stepped; a sample with a round trip 0.1 s longer than
#: the held one's replaces it within 50 s
_CLOCK_DRIFT = 1e-3

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

#: the shard of the cluster-wide keys (node registry, the ``alerts`` lease, notices) and
#: of the topics no partition owns (``alert/...``, ``sensor/...``)
CLUSTER_SHARD = 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_NOT_YET = "not connected yet"


class _Shard:
    """One Redis instance of the bus: its client, scripts, epoch, health and Pub/Sub."""

    def __init__(self, index: int, url: str) -> None:
        self.index = index
        self.url = url
        self.client: coredis.Redis[bytes] | None = None
        self.scripts: dict[str, Any] = {}
        self.epoch: str | None = None
        self.stale = True  # until the first round trip
        self.stale_reason = _NOT_YET
        self.last_ok: float | None = None  # trio clock of the last successful round trip
        self.subscriber_ok = False
        self.pubsub: Any = None  # the live subscription, while it is up
        self.patterned: Any = None  # the subscription that has the all-topics pattern
        self.live_subs: set[str] = set()  # topic channels the current subscription has
        self.part_subs: set[int] = set()  # partition wake-up channels it has


class ClusterBus:
    """One node's connection to the cluster's Redis -- one instance, or several shards
    (``redis_url`` a list): a partition's keys all live on shard ``partition % shards``,
    the cluster-wide keys on shard 0 (docs/cluster.md, "Shards").  Start with
    ``nursery.start(bus.run)``: it returns once every shard answered and its epoch is
    known (``epochs``; ``epoch`` is shard 0's)."""

    def __init__(
        self,
        redis_url: str | Sequence[str],
        prefix: str,
        node_id: str,
        *,
        partitions: int = 1,
        stale_after_s: float = 3.0,
        check_interval_s: float | None = None,
        history: int = 1024,
        gone_ttl_s: float = 3600.0,
        metrics: Metrics | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        urls = [redis_url] if isinstance(redis_url, str) else list(redis_url)
        assert urls, "at least one Redis URL"
        self.redis_urls = urls
        self.redis_url = urls[0]
        self.shards = [_Shard(i, u) for i, u in enumerate(urls)]
        self.partitions = partitions
        self.prefix = prefix
        self.node_id = node_id
        #: the client context for rediss:// shards (None: the system's CAs, no client
        #: certificate); a redis:// shard is plain TCP
        self.tls = tls
        self.stale_after_s = stale_after_s
        # Several checks per stale period, so one slow answer never makes a node stale.
        self.check_interval_s = check_interval_s or min(1.0, stale_after_s / 4)
        self.history = history
        self.gone_ttl_ms = int(gone_ttl_s * 1000)
        self.metrics = metrics or Metrics()
        self.since: float = 0.0  # trio clock of the last change of ``stale``
        # Bumped whenever a shard (re)gains Redis or changes epoch: listeners resync.
        self.generation = 0
        self.changed = trio.Event()  # set (and replaced) on every change of state
        self._handlers: dict[str, list[Handler]] = {}
        self._held: dict[str, _Held] = {}
        self._ever_ok = False
        #: Redis's clock minus this node's monotonic clock (``clock``); until the first
        #: heartbeat this node's wall clock stands in for it.  With it: its error bound
        #: (half the round trip it came from) and when it was taken (monotonic)
        self._clock_offset = time.time() - time.monotonic()
        self._clock_error = float("inf")
        self._clock_at = 0.0
        #: when the cluster last came up, by ``clock`` (``{prefix}:up``; None until the
        #: first heartbeat): the earliest a gateway's outage can be timed from
        self.up_since: float | None = None
        self._was_stale = True
        # Topic channels followed (``follow_topics``), or all of them by pattern.
        self._topic_channels: set[str] = set()
        self._follow_all = False
        self._partitions_followed: set[int] = set()  # wake-up channels (owned partitions)
        self._topic_shards: dict[str, int] = {}  # shard_of_topic's answers
        #: the cluster's shard-list id once this node's shards were checked against it
        #: (``shard_labels_checked``): a shard that lost its data is labelled again
        self._shards_id: str | None = None
        self._m_stale = self.metrics.gauge(
            "cluster_redis_stale", "1 while this node has no working Redis (no live data)")
        self._m_epoch_changes = self.metrics.counter(
            "cluster_epoch_changes_total", "live epoch changes seen (Redis lost its data)")
        self._m_evicting = self.metrics.gauge(
            "cluster_redis_evicting", "1 while a Redis shard of this node may evict keys "
            "under memory pressure (maxmemory set, maxmemory-policy not noeviction), by shard")
        self._m_errors = self.metrics.counter("cluster_redis_errors_total",
                                              "Redis commands that failed, by operation")
        self._m_published = self.metrics.counter("cluster_published_entries_total",
                                                 "topic stream entries this node published")
        self._m_stale.set(1)

    # ------------------------------------------------------------------ keys and shards

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def live_channel(self) -> str:
        return self.key("live")

    @property
    def epoch(self) -> str | None:
        """Shard 0's epoch (the one a single-shard cluster has; ``hello`` carries it)."""
        return self.shards[CLUSTER_SHARD].epoch

    @property
    def epochs(self) -> tuple[str | None, ...]:
        """Every shard's epoch, by shard."""
        return tuple(s.epoch for s in self.shards)

    @property
    def stale(self) -> bool:
        """True while any shard is stale: the node then serves no live data at all (a
        dashboard's topics span shards; half a view shown as live would be worse)."""
        return any(s.stale for s in self.shards)

    @property
    def stale_reason(self) -> str:
        for s in self.shards:
            if s.stale:
                return s.stale_reason if len(self.shards) == 1 else \
                    f"shard {s.index}: {s.stale_reason}"
        return ""

    @property
    def last_ok(self) -> float | None:
        oks = [s.last_ok for s in self.shards]
        return None if None in oks else min(o for o in oks if o is not None)

    @property
    def _client(self) -> coredis.Redis[bytes] | None:
        return self.shards[CLUSTER_SHARD].client

    def shard_of_partition(self, partition: int) -> int:
        return partition % len(self.shards)

    def shard_of_topic(self, topic: str) -> int:
        """A partition's topics live on the partition's shard; topics no partition owns
        (``alert/...``, ``sensor/...``, ``hub/state``) on shard 0."""
        if len(self.shards) == 1:
            return 0
        shard = self._topic_shards.get(topic)
        if shard is None:
            from .owner import topic_partition  # the one rule of who publishes a topic

            p = topic_partition(topic, self.partitions)
            shard = CLUSTER_SHARD if p is None or p < 0 else self.shard_of_partition(p)
            if len(self._topic_shards) > 100_000:  # topics come and go for months
                self._topic_shards.clear()
            self._topic_shards[topic] = shard
        return shard

    def shard_of_gateway(self, gateway_id: str) -> int:
        """A gateway's presence lives with its lot-less records' partition (``gw:<id>``)."""
        if len(self.shards) == 1:
            return 0
        from .partition import partition_of

        return self.shard_of_partition(partition_of("gw:" + gateway_id, self.partitions))

    def shard_of_lease(self, name: str) -> int:
        kind, _, number = name.partition(":")
        if kind == "partition" and number.isdigit():
            return self.shard_of_partition(int(number))
        return CLUSTER_SHARD

    def epoch_of_topic(self, topic: str) -> str | None:
        return self.shards[self.shard_of_topic(topic)].epoch

    def _by_shard(self, items: Sequence[T], shard_of: Callable[[T], int]
                  ) -> dict[int, list[tuple[int, T]]]:
        out: dict[int, list[tuple[int, T]]] = {}
        for i, item in enumerate(items):
            out.setdefault(shard_of(item), []).append((i, item))
        return out

    async def _script_calls(self, what: str, shard: int, script: str,
                            calls: list[tuple[str | list[str], list[Any]]]) -> list[Any]:
        """``script`` once per (key or keys, args) on ``shard``: one round trip (a pipeline
        when there are several), with ``_call``'s deadline."""
        client = self._client_of(shard)
        fn = self.shards[shard].scripts[script]

        def keys(key: str | list[str]) -> list[str]:
            return [key] if isinstance(key, str) else key

        async def run() -> list[Any]:
            if len(calls) == 1:
                key, args = calls[0]
                return [await fn(keys=keys(key), args=args)]
            async with client.pipeline(transaction=False) as pipe:
                futures = [fn(keys=keys(key), args=args, client=pipe) for key, args in calls]
            return [await f for f in futures]

        return list(await self._call(what, run, shard))

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        import coredis  # lazily: the base install runs without the cluster extra

        # A command that gets no answer in half the stale period has failed: the health
        # check retries well within the period.
        timeout = max(0.2, self.stale_after_s / 2)
        with _cancel_wins():
            async with contextlib.AsyncExitStack() as stack:
                for shard in self.shards:
                    url = urlsplit(shard.url)
                    secure = url.scheme == "rediss"
                    client: coredis.Redis[bytes] = coredis.Redis(
                        host=url.hostname or "127.0.0.1", port=url.port or 6379,
                        db=int(url.path.lstrip("/") or 0),
                        # as a URL carries them: percent-encoded
                        username=unquote(url.username) if url.username else None,
                        password=unquote(url.password) if url.password else None,
                        ssl=secure,
                        ssl_context=(self.tls or client_context()) if secure else None,
                        stream_timeout=timeout, connect_timeout=timeout,
                        # The bus retries at its own pace (health loop, publisher): a
                        # command fails fast.
                        retry_policy=coredis.retry.NoRetryPolicy(),
                    )
                    await stack.enter_async_context(client)
                    shard.client = client
                    for name, body in (("publish", _PUBLISH), ("acquire", _ACQUIRE),
                                       ("renew", _RENEW), ("release", _RELEASE),
                                       ("seed", _SEED), ("nodes", _NODES),
                                       ("claim_presence", self._CLAIM_PRESENCE),
                                       ("drop_presence", self._DROP_PRESENCE)):
                        shard.scripts[name] = client.register_script(body)
                await self._serve(task_status)

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        for shard in self.shards:
            backoff = Backoff(0.1, 2.0)
            while True:  # the first round trip: wait for Redis
                if await self._check_shard(shard):
                    break
                await trio.sleep(backoff.next_delay())
            await self._check_eviction(shard)
        async with trio.open_nursery() as nursery:
            for shard in self.shards:
                nursery.start_soon(self._health_loop, shard)
                nursery.start_soon(self._watchdog, shard)
                nursery.start_soon(self._subscriber, shard)
            while self.stale:  # ready once every Pub/Sub subscription is up too
                await self.wait_changed()
            task_status.started()

    async def _call(self, what: str, fn: Callable[[], Awaitable[Any]],
                    shard: int = CLUSTER_SHARD) -> Any:
        """One Redis round trip with a deadline; a success proves the shard reachable."""
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
                self._ok(self.shards[shard])
                raise EpochChanged(str(exc)) from None
            if isinstance(exc, cx.ResponseError) and "LEASE lost" in str(exc):
                self._ok(self.shards[shard])
                raise PartitionFenced(f"{what}: {exc}") from None
            if isinstance(exc, (cx.ConnectionError, TimeoutError, OSError)):
                self._m_errors.inc(op=what)
                raise BusUnavailable(f"{what}: {exc}") from exc
            if isinstance(exc, (cx.AuthenticationError, cx.AuthorizationError)):
                # a password or ACL wrong (or changed on the server): the node cannot use
                # this Redis, as if it were away -- waits, says why, never stops
                self._m_errors.inc(op=what)
                raise BusUnavailable(f"{what}: Redis refused this node "
                                     f"({type(exc).__name__}: {exc}); check the user and "
                                     "password in the Redis URL and its ACL") from None
            raise
        self._ok(self.shards[shard])
        return result

    def _client_of(self, shard: int) -> coredis.Redis[bytes]:
        client = self.shards[shard].client
        assert client is not None
        return client

    def _ok(self, shard: _Shard) -> None:
        shard.last_ok = trio.current_time()
        if shard.stale and shard.subscriber_ok:
            self._set_stale(shard, False, "")

    def _set_stale(self, shard: _Shard, stale: bool, reason: str) -> None:
        if stale == shard.stale:
            if stale and shard.stale_reason == _NOT_YET and reason:
                # never reached yet: say why once (the first check retries quietly)
                shard.stale_reason = reason
                log.error("cluster: cannot use Redis%s yet (%s): this node waits for it",
                          f" shard {shard.index}" if len(self.shards) > 1 else "", reason)
            return
        shard.stale = stale
        shard.stale_reason = reason
        if stale:
            log.error("cluster: lost Redis%s (%s): this node stops serving live data and "
                      "holds no lease there until it is back",
                      f" shard {shard.index}" if len(self.shards) > 1 else "", reason)
            self._drop_leases(shard.index)
        now_stale = self.stale
        if now_stale != self._was_stale:
            self._was_stale = now_stale
            self.since = trio.current_time()
            self._m_stale.set(1 if now_stale else 0)
            if not now_stale:
                if self._ever_ok:
                    log.warning("cluster: Redis reachable again (epochs %s): resyncing",
                                self.epochs)
                else:
                    log.info("cluster: connected to Redis (epochs %s)", self.epochs)
                self._ever_ok = True
        if not stale:
            self.generation += 1
        self._signal()

    def _drop_leases(self, shard: int) -> None:
        for name in [n for n in self._held if self.shard_of_lease(n) == shard]:
            del self._held[name]

    def _signal(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def check(self, shard: int | None = None) -> bool:
        """One health round trip per shard (or to ``shard``): read (create if missing) the
        epoch.  True when every one worked."""
        ok = True
        for s in self.shards if shard is None else [self.shards[shard]]:
            ok = await self._check_shard(s) and ok
        return ok

    async def _check_shard(self, shard: _Shard) -> bool:
        import coredis

        client = shard.client
        assert client is not None
        key = self.key("epoch")
        try:
            value = await self._call("epoch", lambda: client.get(key), shard.index)
            if value is None:
                # Redis lost its data (or this is the cluster's first start): a new epoch.
                # SET NX: one value wins when several nodes race.
                candidate = _new_epoch()
                await self._call("epoch", lambda: client.set(key, candidate, condition=
                                                             coredis.PureToken.NX),
                                 shard.index)
                value = await self._call("epoch", lambda: client.get(key), shard.index)
            if shard.epoch is not None and _text(value) != shard.epoch:
                # Redis lost its data: put the shard's identity back (before the new epoch
                # is taken: a failure retries at the next check), so that a node starting
                # next finds the shard labelled (docs/cluster.md, Shards)
                await self._relabel(shard)
        except BusUnavailable as exc:
            if shard.last_ok is None or \
                    trio.current_time() - shard.last_ok >= self.stale_after_s:
                self._set_stale(shard, True, str(exc))
            return False
        epoch = _text(value)
        if epoch != shard.epoch:
            if shard.epoch is not None:
                log.warning("cluster: live epoch%s changed %s -> %s (Redis lost its data): "
                            "live clients of its topics resync",
                            f" of shard {shard.index}" if len(self.shards) > 1 else "",
                            shard.epoch, epoch)
                self._m_epoch_changes.inc()
                # Leases went with the data: none on this shard is held any more.
                self._drop_leases(shard.index)
            shard.epoch = epoch
            self.generation += 1
            self._signal()
        return True

    # ------------------------------------------------------------------ shard identity

    def shard_label(self, shards_id: str, index: int) -> str:
        """What shard ``index`` of the cluster whose shard list is ``shards_id`` holds in
        ``{prefix}:shard``."""
        return f"{shards_id}/{index}"

    async def read_shard_labels(self) -> list[str | None]:
        """Each shard's identity (one GET per shard), None where it holds none."""
        out: list[str | None] = []
        for shard in self.shards:
            value = await self._call("shard_label", partial(self._client_of(shard.index).get,
                                                     self.key("shard")), shard.index)
            out.append(None if value is None else _text(value))
        return out

    async def claim_shard_labels(self, shards_id: str, shards: Sequence[int]
                                 ) -> list[str | None]:
        """Label these shards (SET NX: a label already there stays) and read every
        shard's label back."""
        for index in shards:
            await self._label(index, shards_id)
        return await self.read_shard_labels()

    def shard_labels_checked(self, shards_id: str) -> None:
        """This node's shards are the cluster's (the store checked their labels): from
        now on it labels a shard again when it sees the shard's data lost."""
        self._shards_id = shards_id

    async def _relabel(self, shard: _Shard) -> None:
        if self._shards_id is not None:
            await self._label(shard.index, self._shards_id)

    async def _label(self, index: int, shards_id: str) -> None:
        import coredis

        client = self._client_of(index)
        label = self.shard_label(shards_id, index)
        await self._call("shard_label", lambda: client.set(
            self.key("shard"), label, condition=coredis.PureToken.NX), index)

    async def _check_eviction(self, shard: _Shard) -> None:
        """Warn when the shard may evict keys: a lease evicted is a partition with two
        owners until the fence refuses the old one; a stream or snapshot evicted, live
        clients resyncing (docs/cluster.md, "Redis must not evict").  Read once, from
        ``INFO memory`` (a managed Redis may forbid CONFIG); not being able to read it is
        no reason to stop."""
        client = shard.client
        assert client is not None
        try:
            info = await self._call("info", lambda: client.info("memory"), shard.index)
        except (BusUnavailable, EpochChanged, PartitionFenced):
            return
        except Exception as exc:  # an INFO this Redis answers otherwise (a proxy, ACL)
            log.debug("cluster: INFO memory of Redis shard %d not read: %s", shard.index, exc)
            return
        policy = _text(info.get("maxmemory_policy", "noeviction"))
        evicting = int(info.get("maxmemory", 0) or 0) > 0 and policy != "noeviction"
        self._m_evicting.set(int(evicting), shard=str(shard.index))
        if evicting:
            log.warning("cluster: Redis%s may evict this cluster's keys under memory "
                        "pressure (maxmemory %s, maxmemory-policy %s): a lease or a topic's "
                        "stream could vanish; set maxmemory-policy noeviction (docs/cluster.md,"
                        " \"Redis must not evict\")",
                        f" shard {shard.index}" if len(self.shards) > 1 else "",
                        _text(info.get("maxmemory_human", info.get("maxmemory"))), policy)

    async def _health_loop(self, shard: _Shard) -> None:
        while True:
            await trio.sleep(self.check_interval_s)
            await self._check_shard(shard)

    async def _watchdog(self, shard: _Shard) -> None:
        """Stale exactly ``stale_after_s`` after the last successful round trip, whatever
        the commands in flight are doing (a cut link makes them hang, not fail)."""
        while True:
            if not shard.stale and shard.last_ok is not None:
                deadline = shard.last_ok + self.stale_after_s
                if trio.current_time() < deadline:
                    await trio.sleep_until(deadline)
                    continue
                self._set_stale(shard, True, f"no answer from Redis for {self.stale_after_s} s")
            await trio.sleep(self.check_interval_s / 2)

    def _part_channel(self, partition: int) -> str:
        return self.key("part", str(partition))

    async def _subscriber(self, shard: _Shard) -> None:
        """The shard's one Pub/Sub connection; dispatches by channel.  It is reopened (and
        listeners resync through ``generation``) whenever it fails or the shard goes stale
        -- messages sent meanwhile are lost, which is why every listener can catch up."""
        import coredis.exceptions as cx

        client = shard.client
        assert client is not None
        backoff = Backoff(0.1, 2.0)
        fixed = [self.key(name) for name in ("live", "notice")]
        topic_prefix = self.live_channel + ":"
        part_prefix = self.key("part") + ":"
        while True:
            try:
                topics = {t for t in self._topic_channels
                          if self.shard_of_topic(t) == shard.index}
                parts = {p for p in self._partitions_followed
                         if self.shard_of_partition(p) == shard.index}
                channels = [*fixed, *(topic_prefix + t for t in topics),
                            *(self._part_channel(p) for p in parts)]
                patterns = [topic_prefix + "*"] if self._follow_all else None
                with _cancel_wins(), trio.CancelScope() as scope:
                    async with client.pubsub(channels=channels, patterns=patterns,
                                             retry_policy=None,
                                             ignore_subscribe_messages=True,
                                             max_idle_seconds=self.check_interval_s,
                                             ) as pubsub:
                        shard.pubsub = pubsub
                        shard.live_subs = topics
                        shard.part_subs = parts
                        if patterns:
                            shard.patterned = pubsub
                        shard.subscriber_ok = True
                        # The epoch read *after* the subscription is up: a listener that
                        # resyncs on this reconnect never reads a Redis that lost its data
                        # as if it were the old epoch's (it would take the emptied heads
                        # for topics gone, not for an epoch change).
                        await self._check_shard(shard)
                        if shard.last_ok is not None and (
                                trio.current_time() - shard.last_ok < self.stale_after_s):
                            self._set_stale(shard, False, "")
                        # Listeners resync after every reconnect of the subscription.
                        self.generation += 1
                        self._signal()
                        backoff.reset()
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._cancel_when_stale, shard, scope)
                            async for message in pubsub:
                                if message["type"] not in ("message", "pmessage"):
                                    continue
                                channel = _text(message["channel"])
                                # a topic's entries -> "live"; the catalogue -> "catalogue"
                                name = ("live" if channel.startswith(topic_prefix)
                                        else "part" if channel.startswith(part_prefix)
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
            shard.pubsub = None
            shard.subscriber_ok = False
            await trio.sleep(backoff.next_delay())
            # Cut off: reconnect once the health checks get through again.
            while True:
                if shard.last_ok is not None and (
                        trio.current_time() - shard.last_ok < self.stale_after_s):
                    break
                await trio.sleep(self.check_interval_s / 2)

    async def follow_all(self) -> None:
        """Receive every topic's entries (one pattern subscription per shard): a node that
        mirrors everything.  Otherwise only ``follow_topics``'s.  Returns once Redis
        confirmed it (or a subscription is down: it is made when it reopens)."""
        self._follow_all = True
        for shard in self.shards:
            pubsub = shard.pubsub
            if pubsub is None or shard.patterned is pubsub:
                continue
            try:
                with trio.fail_after(max(0.5, self.stale_after_s)):
                    await pubsub.psubscribe(self.live_channel + ":*")
            except (trio.TooSlowError, OSError, TimeoutError) as exc:
                raise BusUnavailable(f"psubscribe: {exc!r}") from None
            shard.patterned = pubsub

    def followed_topics(self) -> list[str]:
        """The topics whose channels this node wants (``follow_topics``)."""
        return list(self._topic_channels)

    async def follow_topics(self, add: Sequence[str] = (), remove: Sequence[str] = ()) -> None:
        """Subscribe to (unsubscribe from) these topics' channels, each on its shard.
        Returns once Redis confirmed the subscription, so an entry published after this
        returns is delivered (the caller reads the stream after it: nothing falls in
        between).  Kept across reconnections of the subscription."""
        self._topic_channels.update(add)
        self._topic_channels.difference_update(remove)
        if self._follow_all:
            return  # the pattern has them all
        prefix = self.live_channel + ":"
        for shard in self.shards:
            pubsub = shard.pubsub
            if pubsub is None:
                continue  # subscribed with the rest when the subscription (re)opens
            mine = [t for t in dict.fromkeys(add) if self.shard_of_topic(t) == shard.index]
            gone = [t for t in dict.fromkeys(remove) if t in shard.live_subs]
            # against what *this* subscription has (a reopened one has what was wanted)
            await self._resubscribe(pubsub, shard.live_subs,
                                    [t for t in mine if t not in shard.live_subs], gone,
                                    lambda t: prefix + t)

    async def follow_partitions(self, partitions: Collection[int]) -> None:
        """Receive the wake-ups of exactly these partitions (the ones this node owns):
        ``{prefix}:part:<p>`` on the partition's shard, so a commit wakes the partition's
        owner and no other node."""
        wanted = set(partitions)
        self._partitions_followed = wanted
        for shard in self.shards:
            pubsub = shard.pubsub
            if pubsub is None:
                continue
            mine = {p for p in wanted if self.shard_of_partition(p) == shard.index}
            await self._resubscribe(pubsub, shard.part_subs, sorted(mine - shard.part_subs),
                                    sorted(shard.part_subs - mine), self._part_channel)

    async def _resubscribe(self, pubsub: Any, live: set[Any], new: Sequence[Any],
                           gone: Sequence[Any], channel: Callable[[Any], str]) -> None:
        try:
            with trio.fail_after(max(0.5, self.stale_after_s)):
                for i in range(0, len(new), 500):
                    await pubsub.subscribe(*(channel(t) for t in new[i:i + 500]))
                    live.update(new[i:i + 500])
                for i in range(0, len(gone), 500):
                    await pubsub.unsubscribe(*(channel(t) for t in gone[i:i + 500]))
                    live.difference_update(gone[i:i + 500])
        except (trio.TooSlowError, OSError, TimeoutError) as exc:
            raise BusUnavailable(f"subscribe: {exc!r}") from None
        except Exception as exc:
            import coredis.exceptions as cx

            if isinstance(exc, cx.RedisError):
                raise BusUnavailable(f"subscribe: {exc}") from exc
            raise

    async def _cancel_when_stale(self, shard: _Shard, scope: trio.CancelScope) -> None:
        while not shard.stale:
            await self.wait_changed()
        scope.cancel()

    async def wait_changed(self) -> None:
        await self.changed.wait()

    # ------------------------------------------------------------------ health

    def health(self) -> dict[str, Any]:
        """For /healthz and /api/stats: ``ok`` False while any shard is stale."""
        now = trio.current_time()
        last_ok = self.last_ok
        out: dict[str, Any] = {
            "ok": not self.stale,
            "redis": "stale" if self.stale else "ok",
            "reason": self.stale_reason or None,
            "epoch": self.epoch,
            "last_ok_s_ago": None if last_ok is None else round(now - last_ok, 2),
            "leases_held": len(self._held),
        }
        if len(self.shards) > 1:
            out["shards"] = [{"shard": s.index, "redis": "stale" if s.stale else "ok",
                              "epoch": s.epoch} for s in self.shards]
        return out

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

    async def notify_partitions(self, heads: dict[int, int]) -> None:
        """Best effort: wake the owners of these partitions (each on its own channel: only
        the owner subscribes to it), one pipeline per shard.  Owners also poll."""
        for shard, items in self._by_shard(sorted(heads.items()),
                                           lambda item: self.shard_of_partition(item[0])
                                           ).items():
            client = self._client_of(shard)

            async def run(items: list[tuple[int, tuple[int, int]]] = items,
                          client: Any = client) -> None:
                async with client.pipeline(transaction=False) as pipe:
                    for _, (p, pseq) in items:
                        pipe.publish(self._part_channel(p), f"{p} {pseq}".encode())

            try:
                await self._call("notify", run, shard)
            except BusUnavailable as exc:
                log.debug("cluster: wake-ups not sent: %s", exc)

    async def notify_partition(self, partition: int, pseq: int) -> None:
        await self.notify_partitions({partition: pseq})

    async def notify(self, name: str, data: bytes) -> None:
        """Best effort (on shard 0): a lost notice costs latency, never correctness."""
        client = self._client_of(CLUSTER_SHARD)
        try:
            await self._call("notify", lambda: client.publish(self.key(name), data))
        except BusUnavailable as exc:
            log.debug("cluster: notice %s not sent: %s", name, exc)

    # ------------------------------------------------------------------ topic streams

    async def publish_entries(
        self, epoch: str, entries: Sequence[tuple[str, int, str, bytes, bytes | None]],
        shard: int = CLUSTER_SHARD, lease: tuple[str, int] | None = None,
    ) -> list[int]:
        """Publish ``(topic, n, kind, payload, snapshot)`` entries, all of topics on
        ``shard``, in one pipeline; returns each one's head offset.  Raises
        ``EpochChanged`` when the shard's epoch is not ``epoch`` (nothing of the batch
        after the failing entry is applied), ``PartitionFenced`` when ``lease`` (``(name,
        token)``) is not this node's any more -- on the lease's shard: the lease key says
        so; on another: a newer token has published there -- and ``BusUnavailable``."""
        script = self.shards[shard].scripts["publish"]
        client = self._client_of(shard)
        if lease is None:
            fence_key, fence = self.key("lease", "-"), ""
        elif self.shard_of_lease(lease[0]) == shard:
            fence_key, fence = self.key("lease", lease[0]), f"{self.node_id}:{lease[1]}"
        else:
            fence_key, fence = self.key("pubfence", lease[0]), f"^{lease[1]}"
        common_keys = [self.key("epoch"), self.key("heads"), self.key("topics"), fence_key]
        common_args = [epoch, self.history, self.live_channel, self.gone_ttl_ms, fence]

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

        heads = await self._call("publish", run, shard)
        self._m_published.inc(len(entries))
        return heads

    async def read_topic(self, topic: str, after: int = 0) -> list[StreamEntry]:
        """The topic's stream entries whose last offset is above ``after``."""
        shard = self.shard_of_topic(topic)
        client = self._client_of(shard)
        key = self.key("s", topic)
        start = f"(0-{after}" if after > 0 else "-"
        raw = await self._call("xrange", lambda: client.xrange(key, start, "+"), shard)
        return [_entry(item) for item in raw]

    async def load_topics(
        self, topics: Sequence[str],
    ) -> list[tuple[int | None, bytes | None, list[StreamEntry], int]]:
        """For each topic: (snapshot offset, snapshot data, its whole stream, head)."""
        out: list[Any] = [None] * len(topics)
        for shard, items in self._by_shard(topics, self.shard_of_topic).items():
            client = self._client_of(shard)

            async def run(items: list[tuple[int, str]] = items, client: Any = client
                          ) -> list[Any]:
                async with client.pipeline(transaction=False) as pipe:
                    futures = [(pipe.hgetall(self.key("snap", t)),
                                pipe.xrange(self.key("s", t)),
                                pipe.hget(self.key("heads"), t)) for _, t in items]
                return [(await a, await b, await c) for a, b, c in futures]

            for (i, _), (snap, stream, head) in zip(items, await self._call("load", run, shard),
                                                     strict=True):
                snap = {_text(k): v for k, v in snap.items()}
                offset = int(snap["offset"]) if "offset" in snap else None
                out[i] = (offset, snap.get("data"), [_entry(item) for item in stream],
                          int(head or 0))
        return out

    async def live_topics(self) -> dict[str, int]:
        """Every topic that exists now (on any shard), with its head offset."""
        out: dict[str, int] = {}
        for shard in self.shards:
            client = self._client_of(shard.index)
            members = await self._call(
                "topics", partial(client.smembers, self.key("topics")),
                shard.index)
            topics = sorted(_text(m) for m in members)
            if not topics:
                continue
            heads = await self._call(
                "heads", partial(client.hmget, self.key("heads"), topics), shard.index)
            for t, h in zip(topics, heads, strict=True):
                if self.shard_of_topic(t) == shard.index:  # (a mapping left behind: ignored)
                    out[t] = int(h or 0)
        return out

    # ------------------------------------------------------------------ presence

    async def set_presence(self, gateway_id: str, ttl_s: float, **fields: str) -> None:
        await self.set_presences([gateway_id], ttl_s, **fields)

    async def set_presences(self, gateway_ids: Sequence[str], ttl_s: float,
                            **fields: str) -> None:
        """Keep these gateways' presence alive (one pipeline per shard)."""
        values = {"node": self.node_id, **fields}
        for shard, items in self._by_shard(gateway_ids, self.shard_of_gateway).items():
            client = self._client_of(shard)

            async def run(items: list[tuple[int, str]] = items, client: Any = client) -> None:
                async with client.pipeline(transaction=True) as pipe:
                    for _, gateway in items:
                        key = self.key("presence", gateway)
                        pipe.hset(key, values)
                        pipe.pexpire(key, int(ttl_s * 1000))

            await self._call("presence", run, shard)

    async def presence(self, gateway_id: str) -> dict[str, str] | None:
        shard = self.shard_of_gateway(gateway_id)
        client = self._client_of(shard)
        raw = await self._call("presence",
                               lambda: client.hgetall(self.key("presence", gateway_id)), shard)
        if not raw:
            return None
        return {_text(k): _text(v) for k, v in raw.items()}

    async def heartbeat_node(self, ttl_s: float) -> None:
        """This node is alive for ``ttl_s`` more seconds (``{prefix}:nodes`` on shard 0, a
        sorted set scored by expiry: listing live nodes needs no SCAN)."""
        await self._nodes(ttl_s, heartbeat=True, listing=False)

    async def heartbeat_and_list(self, ttl_s: float) -> list[str]:
        """``heartbeat_node`` and ``live_nodes`` in one round trip (the ownership round)."""
        return await self._nodes(ttl_s, heartbeat=True, listing=True)

    async def live_nodes(self) -> list[str]:
        return await self._nodes(0.0, heartbeat=False, listing=True)

    async def _nodes(self, ttl_s: float, *, heartbeat: bool, listing: bool) -> list[str]:
        # One script: the expiry and the cut-off are both by Redis's clock (``_NODES``).
        script = self.shards[CLUSTER_SHARD].scripts["nodes"]
        sent = time.monotonic()
        (sec, usec), members, up = await self._call("nodes", lambda: script(
            keys=[self.key("nodes"), self.key("up")],
            args=[self.node_id if heartbeat else "", int(ttl_s * 1000),
                  "1" if listing else ""]))
        # Redis read its clock somewhere inside the round trip: its middle is off by at
        # most half of it.  A round trip stretched by load is kept only when no better
        # sample is recent (the bound of the one held grows by a drift allowance), so one
        # slow reply does not move the clock by a second.
        received = time.monotonic()
        error = (received - sent) / 2
        if error <= self._clock_error + (received - self._clock_at) * _CLOCK_DRIFT:
            self._clock_offset = int(sec) + int(usec) / 1e6 - (sent + received) / 2
            self._clock_error, self._clock_at = error, received
        if int(up) >= 0:
            self.up_since = int(up) / 1000
        return sorted(_text(m) for m in members or ())

    def clock(self) -> float:
        """Seconds by Redis's clock (shard 0's ``TIME``), the one clock every node of the
        cluster reads alike: kept as an offset to this node's monotonic clock, refreshed
        by every heartbeat (``heartbeat_and_list``, ``heartbeat_node``, ``live_nodes``), so
        reading it costs no round trip and a step of this node's wall clock never moves
        it.  For durations that one node starts and another ends (docs/cluster.md,
        "Clocks"); not a date to show."""
        return time.monotonic() + self._clock_offset

    @property
    def clock_known(self) -> bool:
        """Whether ``clock`` holds a reading of Redis's yet (a heartbeat or a listing of
        the live nodes): until then it is this node's wall clock."""
        return self._clock_error != float("inf")

    async def leave(self) -> None:
        """Graceful stop: drop this node from the live set at once."""
        client = self._client_of(CLUSTER_SHARD)
        await self._call("nodes", lambda: client.zrem(self.key("nodes"), [self.node_id]))

    # ------------------------------------------------------------------ leases

    async def acquire(self, name: str, ttl_s: float) -> int | None:
        """Take the lease ``name`` for ``ttl_s`` if nobody holds it: its fencing token (one
        more than any token of this name before), or None."""
        shard = self.shard_of_lease(name)
        if self.shards[shard].stale:
            return None
        started = trio.current_time()
        token = await self._call("acquire", lambda: self.shards[shard].scripts["acquire"](
            keys=[self.key("lease", name), self.key("fence", name)],
            args=[self.node_id, int(ttl_s * 1000)]), shard)
        if token is None:
            return None
        token = int(token)
        self._held[name] = _Held(token, started + ttl_s)
        return token

    async def renew(self, name: str, token: int, ttl_s: float) -> bool:
        """Extend our lease (compare-and-pexpire); False: it is no longer ours."""
        return (await self.renew_many({name: token}, ttl_s))[name]

    async def renew_many(self, tokens: dict[str, int], ttl_s: float) -> dict[str, bool]:
        """``renew`` for many leases: one pipeline per shard (an owner renews all its
        partitions every round: one round trip, not one per partition)."""
        out: dict[str, bool] = {}
        started = trio.current_time()
        for shard, items in self._by_shard(sorted(tokens), self.shard_of_lease).items():
            if self.shards[shard].stale:
                for _, name in items:
                    self._held.pop(name, None)
                    out[name] = False
                continue
            results = await self._script_calls("renew", shard, "renew", [
                (self.key("lease", name), [f"{self.node_id}:{tokens[name]}",
                                           int(ttl_s * 1000)]) for _, name in items])
            for (_, name), ok in zip(items, results, strict=True):
                if ok:
                    self._held[name] = _Held(tokens[name], started + ttl_s)
                else:
                    self._held.pop(name, None)
                out[name] = bool(ok)
        return out

    async def release(self, name: str, token: int) -> bool:
        """Give the lease back (compare-and-delete: never someone else's)."""
        self._held.pop(name, None)
        shard = self.shard_of_lease(name)
        ok = await self._call("release", lambda: self.shards[shard].scripts["release"](
            keys=[self.key("lease", name)], args=[f"{self.node_id}:{token}"]), shard)
        return bool(ok)

    def holds(self, name: str) -> int | None:
        """The token of a lease this node may act on *now*, else None: only within the TTL
        counted from before the last acquire/renew was sent, and never while its shard is
        stale (the lease may have expired on Redis without us hearing)."""
        held = self._held.get(name)
        if held is None or self.shards[self.shard_of_lease(name)].stale \
                or trio.current_time() >= held.valid_until:
            return None
        return held.token

    def valid_until(self, name: str) -> float | None:
        """Until when (trio clock) ``holds(name)`` stays true unless the bus changes."""
        held = self._held.get(name)
        return None if held is None else held.valid_until

    async def seed_fence(self, name: str, at_least: int) -> None:
        """Make the next token of ``name`` greater than ``at_least`` (after Redis lost its
        counters, from the highest token PostgreSQL has seen)."""
        await self.seed_fences({name: at_least})

    async def raise_pubfences(self, name: str, token: int) -> None:
        """Fence the publications for the lease ``name`` on every shard but its own at
        ``token`` (a new owner, at its takeover): from here on those shards refuse a
        publication under an older token (``publish_entries``), before this owner has
        published anything there.  Its own shard needs none: the lease key is there."""
        own = self.shard_of_lease(name)
        for shard in range(len(self.shards)):
            if shard != own:
                await self._script_calls("pubfence", shard, "seed",
                                         [(self.key("pubfence", name), [int(token)])])

    async def seed_fences(self, floors: dict[str, int]) -> None:
        """``seed_fence`` for many names: one pipeline per shard."""
        for shard, items in self._by_shard(sorted(floors), self.shard_of_lease).items():
            await self._script_calls("seed", shard, "seed", [
                (self.key("fence", name), [int(floors[name])]) for _, name in items])

    async def lease_holder(self, name: str) -> tuple[str, int] | None:
        return (await self.lease_holders([name]))[name]

    async def lease_holders(self, names: Sequence[str]) -> dict[str, tuple[str, int] | None]:
        """Who holds each lease (one ``MGET`` per shard)."""
        out: dict[str, tuple[str, int] | None] = {}
        for shard, items in self._by_shard(names, self.shard_of_lease).items():
            client = self._client_of(shard)
            keys = [self.key("lease", name) for _, name in items]
            raw = await self._call("lease", partial(client.mget, keys),
                                   shard)
            for (_, name), value in zip(items, raw, strict=True):
                if value is None:
                    out[name] = None
                else:
                    node, _, token = _text(value).rpartition(":")
                    out[name] = (node, int(token))
        return out

    # ---------------------------------------------------- presence by connection, replies
    # (added for the gateway topics and per-die values, docs/cluster.md "A node")

    # ``{prefix}:seen:<gateway>``: when the gateway was last seen connected, by the cluster
    # clock (``clock``): written with every claim and refresh of its presence and when its
    # connection ends, kept ``SEEN_KEEP_S`` after.  The owner of its partition times an
    # outage from it -- a new owner too, for an outage that began while the partition
    # moved (owner.py), not from when it first missed the presence.
    # KEYS: presence, seen.  ARGV: generation, ttl ms, seen ('' unknown), keep ms, fields.
    _CLAIM_PRESENCE = """
local g = redis.call('HGET', KEYS[1], 'generation')
if g and tonumber(g) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4]) end
return 1
"""
    # KEYS: presence, seen.  ARGV: generation, seen ('' unknown), keep ms.
    _DROP_PRESENCE = """
if redis.call('HGET', KEYS[1], 'generation') == ARGV[1] then
  if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3]) end
  return redis.call('DEL', KEYS[1])
end
return 0
"""

    def _seen_now(self) -> str:
        """Now by ``clock`` for a ``seen`` key, or '' before the first heartbeat (the clock
        is this node's wall clock until then: not written)."""
        return repr(self.clock()) if self.clock_known else ""

    async def claim_presence(self, gateway_id: str, generation: int, ttl_s: float,
                             **fields: str) -> bool:
        """``set_presence`` for the gateway's connection of ``generation``, unless a newer
        connection of it (anywhere) holds the presence: an old connection that lingers on
        one node never overwrites its successor's."""
        return (await self.claim_presences({gateway_id: (generation, fields)}, ttl_s))[
            gateway_id]

    async def claim_presences(self, claims: dict[str, tuple[int, dict[str, str]]],
                              ttl_s: float) -> dict[str, bool]:
        """``claim_presence`` for many gateways (gateway -> (generation, fields)): one
        pipeline per shard, so the periodic refresh of every connection a node holds is
        one round trip per shard, not one per gateway.  Each also marks the gateway seen
        now (``last_seen``)."""
        out: dict[str, bool] = {}
        if not claims:
            return out
        seen = self._seen_now()

        def args(gateway: str) -> list[Any]:
            generation, fields = claims[gateway]
            values = {"node": self.node_id, "generation": str(generation), **fields}
            return [generation, int(ttl_s * 1000), seen, int(SEEN_KEEP_S * 1000),
                    *[x for kv in values.items() for x in kv]]

        for shard, items in self._by_shard(sorted(claims), self.shard_of_gateway).items():
            results = await self._script_calls("presence", shard, "claim_presence", [
                ([self.key("presence", gateway), self.key("seen", gateway)], args(gateway))
                for _, gateway in items])
            for (_, gateway), ok in zip(items, results, strict=True):
                out[gateway] = bool(ok)
        return out

    async def drop_presence(self, gateway_id: str, generation: int) -> bool:
        """The connection of ``generation`` ended: its presence goes at once (not after
        its TTL), unless a newer connection holds it (compare-and-delete); the gateway
        was last seen now (``last_seen``)."""
        shard = self.shard_of_gateway(gateway_id)
        script = self.shards[shard].scripts["drop_presence"]
        ok = await self._call("presence", lambda: script(
            keys=[self.key("presence", gateway_id), self.key("seen", gateway_id)],
            args=[str(generation), self._seen_now(), int(SEEN_KEEP_S * 1000)]), shard)
        return bool(ok)

    async def gateway_presence(self, gateway_id: str
                               ) -> tuple[dict[str, str] | None, float | None]:
        """``presence`` and ``last_seen`` of a gateway in one round trip."""
        shard = self.shard_of_gateway(gateway_id)
        client = self._client_of(shard)

        async def run() -> tuple[Any, Any]:
            async with client.pipeline(transaction=False) as pipe:
                raw = pipe.hgetall(self.key("presence", gateway_id))
                seen = pipe.get(self.key("seen", gateway_id))
            return await raw, await seen

        raw, seen = await self._call("presence", run, shard)
        present = {_text(k): _text(v) for k, v in raw.items()} if raw else None
        return present, float(_text(seen)) if seen is not None else None

    async def last_seen(self, gateway_id: str) -> float | None:
        """When the gateway was last seen connected to any node, by ``clock`` (its
        presence claimed, refreshed or dropped); None if not within ``SEEN_KEEP_S``."""
        return (await self.gateway_presence(gateway_id))[1]

    async def put_reply(self, name: str, data: bytes, ttl_s: float) -> None:
        """Leave ``data`` for whoever asked (``take_reply``); it expires after ``ttl_s``.
        (Replies answer notices: both on the cluster-wide shard.)"""
        client = self._client_of(CLUSTER_SHARD)
        await self._call("reply", lambda: client.set(self.key("reply", name), data,
                                                      px=int(ttl_s * 1000)))

    async def take_reply(self, name: str) -> bytes | None:
        """The reply left under ``name`` (removed), or None."""
        client = self._client_of(CLUSTER_SHARD)
        raw = await self._call("reply", lambda: client.getdel(self.key("reply", name)))
        return bytes(raw) if raw is not None else None


def _entry(item: Any) -> StreamEntry:
    entry_id, fields = item.identifier, item.field_values  # coredis's StreamEntry
    ident = _text(entry_id)
    values = {_text(k): v for k, v in fields.items()}
    return StreamEntry(int(ident.split("-", 1)[1]), int(values["n"]), _text(values["k"]),
                       bytes(values["p"]))


__all__ = ["CLUSTER_SHARD", "BusUnavailable", "ClusterBus", "EpochChanged", "StreamEntry",
           "parse_live_message"]
