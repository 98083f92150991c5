"""A Trio driver for paho-mqtt 2.x through its external-loop API (no paho thread).

paho does the MQTT protocol; this module does its I/O from Trio:

- ``connect()`` blocks (DNS, TCP, TLS handshake), so it runs in ``trio.to_thread``; paho
  calls ``on_socket_open`` (and queues CONNECT) from that thread, so those callbacks only
  store state and the Trio side picks it up when the thread returns.
- a *reader* task waits with ``trio.lowlevel.wait_readable(sock)`` and then calls
  ``loop_read`` while the socket (or the TLS object's own buffer, ``sock.pending()``, or
  our read buffer: paho would otherwise make three or four ``recv`` calls per message)
  has data, up to a burst budget.  Between bursts it awaits the ``after_read`` hook, which is
  where the gateway hands records to its sink: while the sink is full the reader simply
  does not read, the kernel buffer fills, TCP's window closes and the broker holds the
  messages.  Nothing is buffered here beyond one burst.
- a *writer* task sleeps until paho wants to write (``on_socket_register_write`` wakes it,
  ``want_write()`` is the truth), waits for ``wait_writable`` and calls ``loop_write``.
- a *misc* task calls ``loop_misc`` once a second (keepalive pings, dead-broker detection),
  except while the reader is paused by backpressure: the PINGRESP could not be read, and
  paho would declare the broker dead and reconnect over and over during a long stall.
- ``on_socket_close`` calls ``trio.lowlevel.notify_closing(sock)`` so a task parked on the
  socket wakes instead of waiting on a closed descriptor, and ends the connection.

paho has no reconnect outside its own loops, so ``run()`` is the reconnect loop:
exponential backoff with full jitter (``edgegw.backoff``), resubscribing after every
connect (a clean session has lost its subscriptions; re-subscribing a persistent one is
harmless).  The SUBACK is not awaited but handled when it is read (refusals are logged):
a reader paused by backpressure must not look like a broken connection.  A broker that
refuses the connection (bad credentials, say) raises ``ConnectRefused`` with the broker's
reason, which is logged, and the connection is retried at the backoff cap.

Failure boundaries (docs/reliability.md): an exception from the ``on_message`` handler is
caught and costs that message (``where="mqtt_message"``); an exception from our other
callbacks, or from paho itself while reading, ends only that connection
(``where="mqtt_connection"``), which is then re-established with backoff.  Each is counted
(``message_errors`` / ``internal_errors``, and in ``internal_errors_total`` of ``metrics``
when given) and logged with its traceback, rate-limited.  Nothing raised in a paho
callback reaches the Trio loop.

Acknowledgements: with ``manual_ack`` paho sends no PUBACK by itself; the owner calls
``ack(mids)`` (in the order the messages arrived) and can send a *fence* (``fence()``, an
UNSUBSCRIBE of a filter nobody uses) whose answer, reported to ``on_fence``, proves the
broker has read every packet sent before it.  ``on_session(session_present)`` is called
when a connection is accepted, before any message of it is handed over.

Why one module of this size: one class drives paho's external-loop API, and its socket
callbacks, read buffer, reconnect loop and acknowledgement order share one paho client's
state; split apart they would be one class spread over files.
"""

from __future__ import annotations

import dataclasses
import logging
import select
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
import trio
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..backoff import Backoff
from ..metrics import Metrics, report_internal_error
from ..tls import client_context
from .sizeguard import PublishSizeGuard

log = logging.getLogger(__name__)

#: a connection must stay up this long before the backoff starts from scratch again, so
#: a broker that accepts and at once drops us (two gateways sharing one client id, say)
#: is not hammered in a tight loop
STABLE_AFTER = 10.0

_AUTH_HINT = {4, 5, 0x86, 0x87, 0x8C}  # bad user name or password / not authorized / bad auth

#: the filter a fence unsubscribes from: nobody subscribes to it ('$' topics are not
#: matched by '#' either), so the UNSUBSCRIBE changes nothing on the broker
FENCE_FILTER = "$edgegw/ack-fence"



class ConnectError(Exception):
    """No connection to the broker (network, TLS, timeout)."""


class ConnectRefused(ConnectError):
    """The broker answered CONNECT with a failure reason code."""

    def __init__(self, message: str, reason_code: int) -> None:
        super().__init__(message)
        self.reason_code = reason_code


@dataclasses.dataclass(frozen=True)
class ConnectOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "edgegw"
    protocol: str = "3.1.1"  # "3.1.1" or "5"
    clean_session: bool = True
    #: MQTT 5 only: how long the broker keeps a persistent session after a disconnect
    session_expiry: int = 7 * 24 * 3600
    keepalive: int = 30
    connect_timeout: float = 10.0
    username: str = ""
    password: str = ""
    ssl_context: ssl.SSLContext | None = None
    #: subscriptions (topic filter, qos) made after every connect
    subscriptions: tuple[tuple[str, int], ...] = ()


def ssl_context(ca_file: str = "", cert_file: str = "", key_file: str = "",
                insecure: bool = False) -> ssl.SSLContext:
    """A client TLS context: the system CAs or ``ca_file``, an optional client certificate,
    and with ``insecure`` neither certificate nor host name checked (test brokers only)."""
    ctx = client_context(ca_file, cert_file, key_file)  # the uplink's, for one behaviour
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _ClosingSSLSocket(ssl.SSLSocket):
    """paho drops the socket without closing it when the TLS handshake fails (inside
    connect(), before ``on_socket_open``); closing it here keeps the descriptor from
    leaking until the garbage collector finds it."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


class _BufferedPaho(paho.Client):
    """paho reads a packet a few bytes at a time: one ``recv`` for the command byte, one
    per remaining-length byte, one for the rest -- three or four system calls per sensor
    message.  This client reads the socket up to 64 KiB at a time and serves paho's reads
    from that buffer (``buffered`` bytes are waiting in it: the reader must not wait for
    the socket while there are).  The buffer belongs to one socket: closing it empties it."""

    READ_SIZE = 65536
    MAX_SKIP_READS = 16  # reads of an oversize payload per call (1 MiB): then let Trio run

    def __init__(self, *args: Any, max_payload: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        # PUBLISH payloads over max_payload are dropped as they arrive (sizeguard.py)
        self.max_payload = max_payload
        self._guard: PublishSizeGuard | None = None
        self.yield_now = False

    @property
    def buffered(self) -> int:
        return len(self._rbuf) - self._rpos

    def _sock_recv(self, bufsize: int) -> bytes:
        reads = 0
        while self._rpos >= len(self._rbuf):
            if reads == self.MAX_SKIP_READS:
                self.yield_now = True  # the reader ends its burst
                raise BlockingIOError  # paho: try again later
            reads += 1
            data = super()._sock_recv(self.READ_SIZE)  # BlockingIOError: nothing there
            if not data:
                return data  # the peer closed
            if self.max_payload is not None:
                if self._guard is None:
                    self._guard = PublishSizeGuard(
                        self.max_payload, v5=self._protocol == MQTTProtocolVersion.MQTTv5)
                data = self._guard.feed(data)  # b"": all of it was an oversize payload
            self._rbuf, self._rpos = data, 0
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start:self._rpos]

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0
        self._guard = None  # its framing state belongs to this socket
        super()._sock_close()


class _Connection:
    """The state of one connection attempt, shared by its tasks and paho's callbacks."""

    def __init__(self) -> None:
        self.sock: Any = None
        self.settled = trio.Event()  # CONNACK arrived or the socket closed
        self.closed = trio.Event()
        self.connack: paho.ReasonCode | None = None
        self.session_present = False
        self.disconnect_reason = ""
        self.write_wanted = trio.Event()
        self.subscribing: dict[int, list[tuple[str, int]]] = {}  # SUBSCRIBE mid -> filters
        self.refused = False  # the broker refused one of this connection's subscriptions
        self.abandoned = False  # set when Trio stopped waiting for connect()'s thread


class TrioMqttClient:
    """One paho client driven from Trio.  ``run()`` connects, reconnects and resubscribes;
    ``publish()`` sends.  Received messages go to ``on_message`` (called in the Trio
    thread, from inside ``loop_read``); ``after_read`` is awaited between read bursts and
    may block to push back; ``burst_full`` ends a burst early."""

    def __init__(
        self,
        options: ConnectOptions,
        *,
        on_message: Callable[[paho.MQTTMessage], None] | None = None,
        before_read: Callable[[], None] | None = None,
        after_read: Callable[[], Awaitable[None]] | None = None,
        burst_full: Callable[[], bool] | None = None,
        backoff: Backoff | None = None,
        read_budget: int = 256,
        max_unacked: int = 1000,
        name: str = "mqtt",
        manual_ack: bool = False,
        on_session: Callable[[bool], None] | None = None,
        on_fence: Callable[[int], None] | None = None,
        metrics: Metrics | None = None,
        max_payload_bytes: int | None = None,
    ) -> None:
        if not options.client_id:
            raise ValueError("an MQTT client id must not be empty")
        self.options = options
        self.name = name
        self.backoff = backoff or Backoff(0.5, 30.0)
        self.read_budget = read_budget
        self.max_unacked = max_unacked
        self._on_message = on_message
        self._before_read = before_read
        self._after_read = after_read
        self._burst_full = burst_full
        self._on_session = on_session
        self._on_fence = on_fence
        self._metrics = metrics or Metrics()
        v5 = options.protocol == "5"
        self.paho = _BufferedPaho(
            CallbackAPIVersion.VERSION2,
            client_id=options.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else options.clean_session,
            manual_ack=manual_ack,
            max_payload=max_payload_bytes,
        )
        # paho would swallow exceptions from our callbacks into a logger nobody reads; our
        # callbacks catch their own (``_guarded``), so anything that still escapes is a
        # paho fault, handled in the reader.
        self.paho.suppress_exceptions = False
        self.paho.connect_timeout = options.connect_timeout
        if options.username:
            self.paho.username_pw_set(options.username, options.password or None)
        if options.ssl_context is not None:
            if options.ssl_context.sslsocket_class is ssl.SSLSocket:
                options.ssl_context.sslsocket_class = _ClosingSSLSocket
            self.paho.tls_set_context(options.ssl_context)
        g = self._guarded
        self.paho.on_socket_open = g(self._cb_socket_open)
        self.paho.on_socket_close = g(self._cb_socket_close)
        self.paho.on_socket_register_write = g(self._cb_register_write)
        self.paho.on_socket_unregister_write = g(self._cb_unregister_write)
        self.paho.on_connect = g(self._cb_connect)
        self.paho.on_disconnect = g(self._cb_disconnect)
        self.paho.on_subscribe = g(self._cb_subscribe)
        self.paho.on_unsubscribe = g(self._cb_unsubscribe)
        self.paho.on_publish = g(self._cb_publish)
        if on_message is not None:
            self.paho.on_message = self._message_boundary(on_message)
        self._conn: _Connection | None = None
        self._trio_thread: int | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._unacked: set[int] = set()
        self._acked = trio.Event()
        # what tests, metrics and logs read
        self.connected = False
        self.connections = 0  # successful connects (CONNACK accepted), ever
        self.connect_failures = 0  # failed attempts, ever
        self.last_error = ""
        self.session_present = False
        self.subscribed = trio.Event()  # set once the first subscriptions are acknowledged
        #: this connection's subscriptions are acknowledged (SUBACK), every one granted:
        #: until then the broker may route a message published meanwhile to nobody; one
        #: refused (an ACL) keeps it False for the connection's life
        self.subscriptions_acked = False
        self.subscriptions_refused = 0  # topic filters the broker refused (SUBACK), ever
        self.paused = False  # the reader waits for the gateway to take data (backpressure)
        self.message_errors = 0  # exceptions raised by on_message, caught here
        self.internal_errors = 0  # exceptions in our other callbacks or inside paho
        self._fences: set[int] = set()

    # ---------------------------------------------------------------- failure boundaries

    def _internal_error(self, where: str, what: str, exc: BaseException) -> None:
        """Count and log (rate-limited, with the traceback); call it in the except block."""
        report_internal_error(self._metrics, where, log, "%s: %s: %s: %.200s", self.name,
                              what, type(exc).__name__, exc)

    def _message_boundary(self, handler: Callable[[paho.MQTTMessage], None]
                          ) -> Callable[[Any, Any, paho.MQTTMessage], None]:
        def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            try:
                handler(msg)
            except Exception as exc:  # one message, not the connection or the process
                self.message_errors += 1
                self._internal_error("mqtt_message", f"handling message {msg.mid} failed", exc)
        return on_message

    def _guarded(self, callback: Callable[..., None]) -> Callable[..., None]:
        def guarded(*args: Any) -> None:
            try:
                callback(*args)
            except Exception as exc:
                self.internal_errors += 1
                self._internal_error("mqtt_connection", f"{callback.__name__} failed", exc)
        return guarded

    # ---------------------------------------------------------------- paho callbacks

    def _in_trio(self) -> bool:
        """Called back by the run that drives this client: neither connect()'s thread
        nor paho's ``__del__`` after that run has ended (a connect it abandoned)."""
        if threading.get_ident() != self._trio_thread:
            return False
        try:
            return trio.lowlevel.current_trio_token() is self._trio_token
        except RuntimeError:  # no Trio run in this thread any more
            return False

    def _cb_socket_open(self, _c: Any, _u: Any, sock: Any) -> None:
        if self._conn is not None:  # from connect()'s thread: only record it
            self._conn.sock = sock

    def _cb_socket_close(self, _c: Any, _u: Any, sock: Any) -> None:
        conn = self._conn
        if not self._in_trio() or conn is None:
            return  # connect() failed in its thread: the socket never reached Trio
        try:
            trio.lowlevel.notify_closing(sock)
        except (OSError, ValueError):  # already closed
            pass
        conn.closed.set()
        conn.settled.set()

    def _cb_register_write(self, _c: Any, _u: Any, _sock: Any) -> None:
        conn = self._conn
        if conn is not None and self._in_trio():
            conn.write_wanted.set()
        # from connect()'s thread: the writer checks want_write() when it starts

    def _cb_unregister_write(self, _c: Any, _u: Any, _sock: Any) -> None:
        pass  # the writer goes back to sleep when want_write() is false

    def _cb_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        conn = self._conn
        if conn is None:
            return
        conn.connack = reason
        conn.session_present = bool(getattr(flags, "session_present", False))
        conn.settled.set()
        self._fences.clear()  # an answer to a fence of the old connection never comes
        if not reason.is_failure and self._on_session is not None:
            # before loop_read hands over the first message of this connection
            self._on_session(conn.session_present)

    def _cb_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        if self._conn is not None:
            self._conn.disconnect_reason = str(reason)

    def _cb_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[Any], _p: Any) -> None:
        conn = self._conn
        if conn is None or mid not in conn.subscribing:
            return
        subs = conn.subscribing.pop(mid)
        refused = [(topic, r) for (topic, _), r in zip(subs, reasons, strict=False)
                   if getattr(r, "is_failure", False)]
        if refused:
            conn.refused = True
            self.subscriptions_refused += len(refused)
        if not conn.subscribing:
            self.subscriptions_acked = not conn.refused
        for topic, reason in refused:
            log.error("%s: broker refused the subscription to %r: %s", self.name, topic, reason)
        if refused:
            self.last_error = f"broker refused the subscription to {refused[0][0]!r}: " \
                              f"{refused[0][1]}"
        self.subscribed.set()

    def _cb_unsubscribe(self, _c: Any, _u: Any, mid: int, _reasons: Any, _p: Any) -> None:
        if mid in self._fences:
            self._fences.discard(mid)
            if self._on_fence is not None:
                self._on_fence(mid)

    def _cb_publish(self, _c: Any, _u: Any, mid: int, _reason: Any, _p: Any) -> None:
        if mid in self._unacked:
            self._unacked.discard(mid)
            if self._in_trio():
                # wake every waiter; later waiters wait on the fresh event
                self._acked.set()
                self._acked = trio.Event()

    # ---------------------------------------------------------------- the I/O tasks

    async def _reader(self, conn: _Connection) -> None:
        sock = conn.sock
        tls_pending = getattr(sock, "pending", None)
        # A zero-timeout poll says whether the kernel has more bytes, so a burst reads
        # everything available without parking in Trio once per message (paho reads
        # one packet per loop_read call).
        poller = select.poll()
        # The writer (started beside this task) may have run first and found the broker
        # gone: paho closed the socket, whose descriptor is then -1 (registering it raised
        # a ValueError out of run(): seen against a broker refusing a client certificate).
        fd = sock.fileno()
        if conn.closed.is_set() or fd < 0:
            conn.closed.set()
            conn.settled.set()
            return
        poller.register(fd, select.POLLIN)
        client = self.paho
        loop_read = client.loop_read
        while True:
            # The socket may have been closed (by the writer or misc task) meanwhile; its
            # descriptor number may already belong to another connection.  No await
            # between this check and the wait, so it cannot go stale.
            if conn.closed.is_set():
                return
            if client.buffered or (tls_pending is not None and tls_pending()):
                # read from the socket already (by us, or by TLS): no waiting for it
                await trio.lowlevel.checkpoint()
                if conn.closed.is_set():
                    return
            else:
                try:
                    await trio.lowlevel.wait_readable(sock)
                except (trio.ClosedResourceError, OSError):
                    return
            if self._before_read is not None:
                self._before_read()
            for _ in range(self.read_budget):
                try:
                    rc = loop_read()
                except Exception as exc:
                    # paho itself failed on what it read (our callbacks catch their own):
                    # end this connection, not the process; run() reconnects with backoff
                    self.internal_errors += 1
                    self._internal_error("mqtt_connection", "reading from the broker failed",
                                         exc)
                    conn.disconnect_reason = f"internal error: {type(exc).__name__}: {exc}"
                    conn.closed.set()
                    conn.settled.set()
                    return
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or conn.closed.is_set():
                    return  # paho has closed the socket; on_socket_close ended the connection
                if self._burst_full is not None and self._burst_full():
                    break
                if client.yield_now:  # dropping a long oversize payload: let Trio run
                    client.yield_now = False
                    break
                if client.buffered or (tls_pending is not None and tls_pending()):
                    continue
                if not poller.poll(0):
                    break
            if self._after_read is not None:
                # May block while the gateway is full: that is the backpressure.  Only
                # after a burst, so a new connection always reads its CONNACK first.
                self.paused = True
                try:
                    await self._after_read()
                finally:
                    self.paused = False

    async def _writer(self, conn: _Connection) -> None:
        sock = conn.sock
        while True:
            if not self.paho.want_write():
                conn.write_wanted = trio.Event()
                await conn.write_wanted.wait()
                continue
            if conn.closed.is_set():  # see _reader
                return
            try:
                await trio.lowlevel.wait_writable(sock)
            except (trio.ClosedResourceError, OSError):
                return
            if self.paho.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    async def _misc(self, conn: _Connection) -> None:
        while True:
            await trio.sleep(1.0)
            # While the reader is paused by backpressure the PINGRESP cannot be read, and
            # paho would call the broker dead and reconnect over and over.  Instead stay
            # quiet: the broker may drop us after 1.5 x keepalive, which the reader sees
            # once the gateway takes data again (then we reconnect; a persistent session
            # gets everything unacknowledged again).
            if self.paused:
                continue
            if self.paho.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    # ---------------------------------------------------------------- one connection

    def _blocking_connect(self, conn: _Connection) -> None:
        o = self.options
        kwargs: dict[str, Any] = {}
        if o.protocol == "5":
            kwargs["clean_start"] = o.clean_session
            if not o.clean_session:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = o.session_expiry
                kwargs["properties"] = props
        self.paho.connect(o.host, o.port, keepalive=o.keepalive, **kwargs)
        if conn.abandoned:  # Trio gave up waiting (shutdown): do not leak the socket
            sock = self.paho.socket()
            if sock is not None:
                sock.close()

    async def _connect(self, nursery: trio.Nursery) -> _Connection:
        """Open the socket, start the I/O tasks in ``nursery``, wait for CONNACK."""
        o = self.options
        conn = self._conn = _Connection()
        where = f"{o.host}:{o.port}"
        try:
            # Abandoned on cancel, so that stopping the gateway never waits for a
            # connect to a black-holed broker (up to connect_timeout).
            await trio.to_thread.run_sync(self._blocking_connect, conn, abandon_on_cancel=True)
        except trio.Cancelled:
            conn.abandoned = True
            raise
        except ssl.SSLError as exc:
            raise ConnectError(f"TLS handshake with {where} failed: {exc}") from None
        except (OSError, ValueError) as exc:
            raise ConnectError(f"cannot connect to {where}: {exc}") from None
        conn.sock = self.paho.socket()
        if conn.sock is None:
            raise ConnectError(f"cannot connect to {where}: paho opened no socket")
        for task in (self._reader, self._writer, self._misc):
            nursery.start_soon(task, conn)
        with trio.move_on_after(o.connect_timeout) as timeout:
            await conn.settled.wait()
        if timeout.cancelled_caught:
            raise ConnectError(f"no CONNACK from {where} within {o.connect_timeout:g} s")
        rc = conn.connack
        if rc is None:
            reason = conn.disconnect_reason
            detail = f" ({reason})" if reason and reason != "Unspecified error" else ""
            if o.ssl_context is not None:
                # TLS 1.3 reports a refused client certificate only after the handshake
                detail += " — with TLS: does the broker want a client certificate?"
            raise ConnectError(f"{where} closed the connection before CONNACK{detail}")
        if rc.is_failure:
            hint = " — check the username and password" if rc.value in _AUTH_HINT else ""
            raise ConnectRefused(f"broker {where} refused the connection: {rc}{hint}", rc.value)
        return conn

    def _subscribe(self, conn: _Connection) -> None:
        """Send SUBSCRIBE; the SUBACK is handled by ``_cb_subscribe`` whenever the reader
        gets to it.  Not awaited: under backpressure the reader may not read for a while,
        and that must not look like a broken connection."""
        subs = list(self.options.subscriptions)
        if not subs:
            self.subscriptions_acked = True
            self.subscribed.set()
            return
        rc, mid = self.paho.subscribe(subs)
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            # the broker's next packet after CONNACK ended the connection (paho's "not
            # currently connected" alone sent operators looking at the subscriptions)
            reason = conn.disconnect_reason
            detail = f" ({reason})" if reason and reason != "Unspecified error" else ""
            raise ConnectError(f"the connection closed right after CONNACK{detail}, before "
                               f"SUBSCRIBE")
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectError(f"cannot subscribe: {paho.error_string(rc)}")
        conn.subscribing[mid] = subs

    def _close_quietly(self, conn: _Connection) -> None:
        """Best-effort DISCONNECT (non-blocking) and close, on shutdown."""
        if conn.closed.is_set() or self.paho.socket() is None:
            return
        try:
            self.paho.disconnect()
            self.paho.loop_write()  # sends DISCONNECT and makes paho close the socket
        except Exception:  # shutting down anyway
            log.debug("%s: error while disconnecting", self.name, exc_info=True)
        sock = self.paho.socket()
        if sock is not None:  # the DISCONNECT could not be written at once: just close
            self._cb_socket_close(self.paho, None, sock)
            sock.close()

    def _set_connected(self, value: bool) -> None:
        self.connected = value
        if not value:
            self.subscriptions_acked = False

    async def _serve_one(self) -> float:
        """One connection, from connect to loss; returns how long it was up (seconds)."""
        error: Exception | None = None
        up_for = 0.0
        async with trio.open_nursery() as nursery:
            conn: _Connection | None = None
            try:
                conn = await self._connect(nursery)
                up_since = time.monotonic()
                self.session_present = conn.session_present
                self.connections += 1
                self._subscribe(conn)
                self._set_connected(True)
                log.info("%s: connected to %s:%d (session present: %s)", self.name,
                         self.options.host, self.options.port, conn.session_present)
                await conn.closed.wait()
                up_for = time.monotonic() - up_since
                reason = conn.disconnect_reason
                self.last_error = "connection lost" + (
                    f": {reason}" if reason and reason != "Unspecified error" else
                    " (closed by the broker or the network)")
            except ConnectError as exc:
                # caught here, not outside, so that it is not wrapped in an ExceptionGroup
                error = exc
            finally:
                if self.connected:
                    self._set_connected(False)
                if conn is None:
                    conn = self._conn
                if conn is not None and not conn.abandoned:
                    self._close_quietly(conn)
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        return up_for

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, and reconnect forever (until cancelled).  Started at once: wait
        for ``subscribed`` (or watch ``connected``) to know the broker is reached."""
        self._trio_thread = threading.get_ident()
        self._trio_token = trio.lowlevel.current_trio_token()
        task_status.started()
        while True:
            try:
                up_for = await self._serve_one()
                if up_for >= STABLE_AFTER:
                    self.backoff.reset()
                level = logging.WARNING
            except ConnectError as exc:
                self.connect_failures += 1
                self.last_error = str(exc)
                level = logging.ERROR if isinstance(exc, ConnectRefused) else logging.WARNING
            delay = self.backoff.next_delay()
            log.log(level, "%s: %s; reconnecting in %.1f s", self.name, self.last_error, delay)
            await trio.sleep(delay)

    # ---------------------------------------------------------------- acknowledging

    @property
    def can_send(self) -> bool:
        """The broker accepted this connection (CONNACK read) and it is still open."""
        conn = self._conn
        return (conn is not None and conn.connack is not None and not conn.connack.is_failure
                and not conn.closed.is_set())

    def ack(self, mids: Sequence[int]) -> bool:
        """Send the PUBACKs of QoS 1 messages ``mids``, in that order (``manual_ack``);
        False when there is no connection to send them on."""
        if not self.can_send:
            return False
        ack = self.paho.ack
        for mid in mids:
            ack(mid, 1)
        return True

    def fence(self) -> int | None:
        """Send a fence; its id is reported to ``on_fence`` once the broker has read every
        packet sent before it.  None when there is no connection."""
        if not self.can_send:
            return None
        rc, mid = self.paho.unsubscribe(FENCE_FILTER)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return None
        self._fences.add(mid)
        return mid

    # ---------------------------------------------------------------- publishing

    async def publish(self, topic: str, payload: bytes | str, qos: int = 0,
                      retain: bool = False) -> None:
        """Queue a message; waits while ``max_unacked`` QoS>0 messages are unacknowledged
        (also while disconnected: paho resends them after the reconnect)."""
        while len(self._unacked) >= self.max_unacked:
            await self._acked.wait()
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            self._unacked.add(info.mid)
        elif len(getattr(self.paho, "_out_packet", ())) > self.max_unacked:
            # QoS 0 has no ack to wait for: let the writer drain paho's output queue
            await trio.sleep(0.001)

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    async def wait_all_acked(self) -> None:
        while self._unacked:
            await self._acked.wait()


def subscriptions_of(filters: Sequence[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """The distinct (filter, qos) pairs, highest qos kept for a repeated filter."""
    best: dict[str, int] = {}
    for topic, qos in filters:
        best[topic] = max(qos, best.get(topic, 0))
    return tuple(best.items())
