"""The hub's configuration (``edgegw hub --config hub.toml``)."""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Literal

from ..auth.config import AuthConfig, TlsConfig
from ..config import Range, host_problem
from ..web import HttpLimits
from .alerts import AlertsConfig
from .fanout.config import LiveConfig


@dataclasses.dataclass(frozen=True)
class ClusterSection:
    """``[hub.cluster]``: this hub is one node of a cluster on PostgreSQL and Redis
    (docs/cluster.md).  Absent: the single hub on its SQLite store.

    Defined here rather than in ``edgegw.hub.cluster`` (which re-exports it) so that the
    hub's config does not import the cluster package: the cluster's node assembly imports
    the hub's ingest and config, and the import-linter forbids cycles between siblings."""

    # unique per node (two nodes with one id would renew each other's leases); the
    # default is the host name and the process id, unique but new at every start
    node_id: str = ""
    # libpq connection string or URI of the cluster's PostgreSQL database (the durable
    # truth); a password is better kept in ~/.pgpass or PGPASSWORD than here
    postgres_dsn: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    # several Redis instances (shards), used instead of redis_url when set: a partition's
    # keys live on shard ``partition % len(redis_urls)``, the cluster-wide ones on the
    # first; every node must list the same URLs in the same order (docs/cluster.md)
    redis_urls: list[str] = dataclasses.field(default_factory=list)
    # for rediss:// URLs (TLS): the CA file that signed the Redis server's certificate
    # (empty: the system's CAs), and this node's client certificate and key (for a Redis
    # with tls-auth-clients, its default).  A password goes in the URL:
    # rediss://user:password@host:6380/0 (percent-encoded), or redis://:password@...
    redis_tls_ca_file: str = ""
    redis_tls_cert_file: str = ""
    redis_tls_key_file: str = ""
    # prefix of every Redis key: several clusters may share one Redis
    key_prefix: str = "edgegw"
    # fixed for the life of the cluster: stored in PostgreSQL by the first node; a node
    # configured with another number refuses to start (lots would change partitions)
    partitions: Annotated[int, Range(1, 4096)] = 64
    # a dead node's partitions move to live nodes within about this
    lease_ttl_s: Annotated[float, Range(0.5, 600)] = 5.0
    # how often an owner stores a changed topic's snapshot in Redis
    snapshot_interval_s: Annotated[float, Range(0.05, 600)] = 0.5
    # no successful Redis round trip for this long: the node stops serving live data
    stale_after_s: Annotated[float, Range(0.5, 600)] = 3.0
    # an owner checkpoints a partition's state after this many records or seconds
    checkpoint_records: Annotated[int, Range(100, 100_000_000)] = 100_000
    checkpoint_interval_s: Annotated[float, Range(1, 86_400)] = 30.0
    # PostgreSQL connections this node commits on (commits of different gateways run in
    # parallel, each in its own worker thread)
    pg_connections: Annotated[int, Range(1, 64)] = 4
    # PostgreSQL ends this node's session when a transaction of it sits idle this long (the
    # node is paused: SIGSTOP, a frozen VM) and so frees its row locks for the other nodes;
    # safe because every owner write is fenced (docs/cluster.md, "A node paused"); and a
    # claim or commit timed out on a row ends another node's session holding it whose
    # transaction is this old (paused mid-statement: not idle).  0: the lease TTL (a node
    # paused that long has lost its leases anyway)
    pg_idle_in_transaction_timeout_s: Annotated[float, Range(0.5, 600, also=0)] = 0.0
    # a claim (a gateway's HELLO, a partition's new owner) or a commit waits at most this
    # long for a row lock, then gives up and tries again (counted); 0: the lease TTL
    pg_lock_timeout_s: Annotated[float, Range(0.1, 600, also=0)] = 0.0

    @property
    def idle_in_transaction_timeout(self) -> float:
        """``pg_idle_in_transaction_timeout_s`` in effect (0: ``lease_ttl_s``)."""
        return self.pg_idle_in_transaction_timeout_s or self.lease_ttl_s

    @property
    def lock_timeout(self) -> float:
        """``pg_lock_timeout_s`` in effect (0: ``lease_ttl_s``)."""
        return self.pg_lock_timeout_s or self.lease_ttl_s

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if not self.postgres_dsn:
            problems.append(("postgres_dsn", "required in cluster mode"))
        if not re.fullmatch(r"[A-Za-z0-9._:-]{0,64}", self.node_id):
            problems.append(("node_id", "at most 64 of A-Z a-z 0-9 . _ : -"))
        if not re.fullmatch(r"redis(s)?://\S+", self.redis_url):
            problems.append(("redis_url", "expected redis://host:port/db or rediss://..."))
        for i, url in enumerate(self.redis_urls):
            if not isinstance(url, str) or not re.fullmatch(r"redis(s)?://\S+", url):
                problems.append((f"redis_urls.{i}",
                                 "expected redis://host:port/db or rediss://..."))
        if len(set(self.redis_urls)) != len(self.redis_urls):
            problems.append(("redis_urls", "a URL is listed twice (each shard once)"))
        if len(self.redis_urls) > self.partitions:
            problems.append(("redis_urls", f"more shards ({len(self.redis_urls)}) than "
                             f"partitions ({self.partitions}): some would hold nothing"))
        tls_keys = ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")
        if any(getattr(self, k) for k in tls_keys) and not any(
                u.startswith("rediss://") for u in (self.redis_urls or [self.redis_url])
                if isinstance(u, str)):
            # a TLS setting with no TLS URL: the operator meant TLS and would get plain text
            problems.append((next(k for k in tls_keys if getattr(self, k)),
                             "set, but no Redis URL is rediss:// (TLS)"))
        if self.redis_tls_key_file and not self.redis_tls_cert_file:
            problems.append(("redis_tls_key_file", "needs redis_tls_cert_file"))
        if not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", self.key_prefix):
            problems.append(("key_prefix", "1-64 of A-Z a-z 0-9 . _ : -"))
        return problems


@dataclasses.dataclass(frozen=True)
class HubSection:
    listen: str = "127.0.0.1"
    port: Annotated[int, Range(1, 65535, also=0)] = 8765  # 0: any free port
    data_dir: str = "./edgegw-hub-data"
    heartbeat_s: Annotated[float, Range(1, 3600)] = 5.0
    hello_timeout_s: Annotated[float, Range(1, 600)] = 10.0
    max_frame_bytes: Annotated[int, Range(1024, 64 << 20)] = 8 << 20
    max_records_per_frame: Annotated[int, Range(1, 1_000_000)] = 50_000
    # how many holes the applied sequence set may have: >0 lets a gateway send live
    # frames ahead of its backlog after an outage (see docs/protocol.md)
    max_holes: Annotated[int, Range(0, 1000)] = 8
    # frames in flight per gateway between receipt and durable commit
    apply_queue_frames: Annotated[int, Range(1, 65536)] = 64
    # records durably applied (and acknowledged) but not yet applied to the live state, at
    # most: past it the gateways' appliers wait before their next commit (backpressure).
    # 0: the live state is applied inside each commit's step, as before (docs/storage.md)
    live_queue_records: Annotated[int, Range(1000, 10_000_000, also=0)] = 200_000
    # frame-body encodings accepted from a gateway that offers one (docs/protocol.md section 5.1)
    compression: Literal["off", "zlib"] = "off"
    # the newest wire protocol version to speak (docs/protocol.md section 9): 3 (columnar
    # bodies, float columns as typed arrays) or 2 (columnar bodies) with gateways that
    # offer it, 1 with the rest; 1 pins every gateway to v1
    max_protocol_version: Annotated[int, Range(1, 3)] = 3
    # load shedding: with this many gateway handshakes under way, a readiness probe or an
    # upgrade on /ws/gateway is answered 503 with Retry-After: busy_retry_after_s
    max_pending_handshakes: Annotated[int, Range(1, 1_000_000)] = 1000
    busy_retry_after_s: Annotated[float, Range(0.1, 3600)] = 5.0
    # failed gateway handshakes allowed per remote address: a burst, then this many per
    # minute (further upgrades from it are answered 429 before any handshake)
    gateway_failures_burst: Annotated[int, Range(1, 1_000_000)] = 10
    gateway_failures_per_minute: Annotated[float, Range(0.01, 1_000_000)] = 6.0
    keep_frame_bodies: bool = True
    # applied frames older than this are deleted (they only serve the live-state rebuild
    # at start-up); the applied sequence sets that de-duplicate are kept.  0: keep forever
    retain_frames_hours: Annotated[float, Range(0, 876_000)] = 168.0
    # ... and the oldest go first while the stored frame bodies (compressed) exceed this
    # many MB; 0: no byte limit (docs/storage.md)
    retain_frames_mb: Annotated[float, Range(0, 100_000_000)] = 0.0
    prune_interval_s: Annotated[float, Range(0.01, 86_400)] = 600.0
    # archived lots and wafers (the history API's past lots) written more than this many
    # days ago are deleted, by the same pruner; 0 keeps them for good (docs/storage.md)
    retain_history_days: Annotated[float, Range(0, 36_500)] = 0.0
    # the live state is checkpointed this often (seconds; 0: never, a restart replays every
    # retained frame), and sooner once this many records came in since the last one: a
    # restart replays at most about that many records (docs/storage.md)
    checkpoint_interval_s: Annotated[float, Range(1, 86_400, also=0)] = 60.0
    checkpoint_records: Annotated[int, Range(1000, 100_000_000)] = 300_000
    # Survivors of young garbage collections are frozen this often (seconds; 0: off), so the
    # collector's full collections never walk the live state (see edgegw/hub/gcpacing.py);
    # a full sweep for cyclic garbage runs every gc_full_sweep_s (0: never).
    gc_freeze_s: Annotated[float, Range(0.1, 3600, also=0)] = 1.0
    gc_full_sweep_s: Annotated[float, Range(1, 604_800, also=0)] = 600.0
    # [hub.cluster]: run as one node of a cluster (docs/cluster.md); None: a single hub
    cluster: ClusterSection | None = None

    def validate(self) -> list[tuple[str, str]]:
        # numeric ranges are declared on the fields (Range) and checked by the loader
        problems = []
        why = host_problem(self.listen)
        if why:
            problems.append(("listen", why))
        if not self.data_dir:
            problems.append(("data_dir", "must not be empty"))
        if self.retain_history_days and not (
                self.retain_frames_hours
                and self.retain_history_days * 24 >= self.retain_frames_hours):
            # a replay of frames still kept would archive a lot again from what is left
            # of them, after its full archive was deleted
            frames = (f"{self.retain_frames_hours:g} h" if self.retain_frames_hours
                      else "0: frames kept for good")
            problems.append(("retain_history_days", (
                f"{self.retain_history_days:g} days must cover hub.retain_frames_hours "
                f"({frames}): archives are never deleted before the frames they were made "
                "from")))
        return problems


@dataclasses.dataclass(frozen=True)
class GatewayAuth:
    """A gateway's token, in clear or as its SHA-256 (hex): one of the two."""

    token: str = dataclasses.field(default="", repr=False)  # never in a log line
    token_sha256: str = ""

    def validate(self) -> list[tuple[str, str]]:
        if bool(self.token) == bool(self.token_sha256):
            return [("token", "give exactly one of token and token_sha256")]
        if self.token_sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", self.token_sha256):
            return [("token_sha256", "must be 64 hex digits (sha256sum of the token)")]
        return []


@dataclasses.dataclass(frozen=True)
class HubConfig:
    hub: HubSection = dataclasses.field(default_factory=HubSection)
    # gateway id -> its token; a gateway not listed here is refused
    gateways: dict[str, GatewayAuth] = dataclasses.field(default_factory=dict)
    live: LiveConfig = dataclasses.field(default_factory=LiveConfig)
    # timeouts and connection caps of the one HTTP port (edgegw/web/server.py)
    http: HttpLimits = dataclasses.field(default_factory=HttpLimits)
    alerts: AlertsConfig = dataclasses.field(default_factory=AlertsConfig)
    # sign-in for the dashboard, the API and /ws/live; none: open, loopback only
    auth: AuthConfig | None = None
    tls: TlsConfig = dataclasses.field(default_factory=TlsConfig)
