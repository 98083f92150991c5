"""The acknowledgement ledger of the MQTT source (sans-IO): when a QoS 1 message may be
acknowledged, what each put's checkpoint claims, and which redelivered messages are
recognised — after a reconnect and after a restart."""

from __future__ import annotations

from array import array

import pytest

from edgegw.mqtt import AckLedger, CheckpointError, Group, keys_from_checkpoint


def key(mid: int, payload: int = 0) -> int:
    return (mid << 32) | payload


def stored(ledger: AckLedger, put: int) -> set[int]:
    return set(keys_from_checkpoint(ledger.checkpoint(put)))


def test_acks_wait_until_the_put_holding_the_message_is_durable() -> None:
    ledger = AckLedger()
    for mid in (1, 2, 3):
        ledger.add(mid, key(mid), ledger.pending)
    assert ledger.acks() == []  # decoded is not enough
    n = ledger.seal()
    assert ledger.acks() == []  # handed to the gateway is not enough either
    ledger.durable(n)
    assert ledger.acks() == [1, 2, 3]
    assert ledger.acks() == [] and ledger.unacked == 0


def test_acks_go_out_in_arrival_order_even_when_a_later_message_is_durable_first() -> None:
    ledger = AckLedger()
    window = Group()  # a throttle's open windows
    ledger.add(1, key(1), window)
    ledger.add(2, key(2), ledger.pending)  # a raw reading, after it
    ledger.durable(ledger.seal())  # the raw reading is stored; the window is still open
    assert ledger.acks() == []  # 2 must not overtake 1
    ledger.ready(window)  # the window closed: its record goes with the next put
    ledger.add(3, key(3), ledger.pending)
    n = ledger.seal()
    assert ledger.acks() == []
    ledger.durable(n)
    assert ledger.acks() == [1, 2, 3]


def test_a_message_that_stored_nothing_is_acknowledged_in_its_turn() -> None:
    ledger = AckLedger()
    ledger.add(1, key(1), ledger.pending)
    ledger.add(2, key(2), None)  # a poison or bad payload: nothing to store
    assert ledger.acks() == []  # still behind 1
    ledger.durable(ledger.seal())
    assert ledger.acks() == [1, 2]
    ledger.add(3, key(3), None)
    assert ledger.acks() == [3]  # nothing ahead of it: at once


def test_a_checkpoint_claims_exactly_the_sealed_messages_not_yet_known_acknowledged() -> None:
    ledger = AckLedger()
    window = Group()
    ledger.add(1, key(1), window)  # open window: not stored
    ledger.add(2, key(2), ledger.pending)
    n = ledger.seal()
    assert stored(ledger, n) == {key(2)}
    ledger.durable(n)
    assert ledger.acks() == []  # 1 is first and its window is open
    ledger.ready(window)
    n = ledger.seal()
    assert stored(ledger, n) == {key(1), key(2)}
    ledger.durable(n)
    assert ledger.acks() == [1, 2]
    # PUBACKs written are not yet PUBACKs read by the broker: still claimed ...
    assert stored(ledger, ledger.seal()) == {key(1), key(2)}
    assert ledger.fence_wanted
    ledger.fence_sent(100)
    ledger.add(3, key(3), ledger.pending)
    n = ledger.seal()
    assert stored(ledger, n) == {key(1), key(2), key(3)}
    ledger.fence_done(100)  # ... until a fence sent after them comes back
    assert stored(ledger, ledger.seal()) == {key(3)}
    assert ledger.remembered == 1


def test_a_message_redelivered_after_a_reconnect_is_dropped_and_acknowledged_once_stored(
        ) -> None:
    ledger = AckLedger()
    window = Group()
    ledger.add(1, key(1, 11), ledger.pending)
    ledger.add(2, key(2, 22), window)
    ledger.durable(ledger.seal())
    assert ledger.acks() == [1]
    # the connection drops before 1's PUBACK is confirmed and before 2 is stored
    ledger.connected(session_present=True)
    assert ledger.orphans == 2
    # the broker sends both again, flagged DUP, with their packet ids
    assert ledger.redelivered(1, key(1, 11))
    assert ledger.redelivered(2, key(2, 22))
    assert not ledger.redelivered(3, key(3, 33))  # never seen: processed as new
    ledger.add(3, key(3, 33), ledger.pending, fresh=False)
    assert ledger.duplicates == 2
    assert ledger.acks() == [1]  # 2 waits for its (original) window
    ledger.ready(window)
    ledger.durable(ledger.seal())
    assert ledger.acks() == [2, 3]


def test_orphans_not_sent_again_are_forgotten_after_a_fresh_message_and_a_fence() -> None:
    ledger = AckLedger()
    ledger.add(1, key(1), ledger.pending)
    ledger.add(2, key(2), ledger.pending)
    ledger.durable(ledger.seal())
    assert ledger.acks() == [1, 2]
    ledger.connected(session_present=True)  # were the PUBACKs read? unknown
    assert ledger.orphans == 2
    assert ledger.redelivered(2, key(2))  # 2's was not: it comes again
    assert not ledger.fence_wanted  # the broker may still be re-sending
    ledger.add(7, key(7), ledger.pending, fresh=True)  # re-sending is over
    ledger.durable(ledger.seal())
    assert ledger.acks() == [2, 7]
    assert ledger.fence_wanted
    ledger.fence_sent(50)
    ledger.fence_done(50)
    assert ledger.orphans == 0 and ledger.remembered == 0
    assert stored(ledger, ledger.seal()) == set()


def test_without_a_session_nothing_comes_again_and_nothing_is_remembered() -> None:
    ledger = AckLedger()
    ledger.add(1, key(1), ledger.pending)
    ledger.durable(ledger.seal())
    ledger.connected(session_present=False)
    assert ledger.orphans == 0 and ledger.remembered == 0 and ledger.unacked == 0
    assert not ledger.redelivered(1, key(1))


def test_a_fence_of_the_previous_connection_confirms_nothing() -> None:
    ledger = AckLedger()
    ledger.add(1, key(1), ledger.pending)
    ledger.durable(ledger.seal())
    assert ledger.acks() == [1]
    ledger.fence_sent(9)
    ledger.connected(session_present=True)
    ledger.fence_done(9)  # cannot arrive on the new connection; if it did, ignored
    assert ledger.orphans == 1 and ledger.remembered == 1


def test_after_a_restart_the_stored_messages_that_come_again_are_dropped_at_once() -> None:
    before = AckLedger()
    before.add(1, key(1, 5), before.pending)
    before.add(2, key(2, 6), Group())  # in an open window when the process died
    checkpoint = before.checkpoint(before.seal())
    after = AckLedger(keys_from_checkpoint(checkpoint))
    after.connected(session_present=True)
    assert after.redelivered(1, key(1, 5))  # stored before the crash: dropped
    assert not after.redelivered(2, key(2, 6))  # lost with the process: processed again
    after.add(2, key(2, 6), after.pending, fresh=False)
    assert after.acks() == [1]  # already durable: at once
    after.durable(after.seal())
    assert after.acks() == [2]
    # the restored key stays claimed until its PUBACK is confirmed
    assert key(1, 5) in stored(after, after.seal())


def test_a_packet_id_reused_for_a_new_message_moves_its_key_to_the_new_message() -> None:
    ledger = AckLedger()
    first, second = Group(), Group()
    ledger.add(1, key(1), first)
    ledger.add(1, key(1), second)  # same id, same payload, a new message (not DUP)
    assert first.remaining == 0 and second.remaining == 1
    assert ledger.remembered == 1


@pytest.mark.parametrize("bad", [None, {"v": 2, "stored": b""}, {"v": 1, "stored": b"123"},
                                 {"v": 1, "stored": "text"}, [1, 2]])
def test_a_checkpoint_that_is_not_ours_is_refused(bad: object) -> None:
    with pytest.raises(CheckpointError):
        keys_from_checkpoint(bad)


def test_checkpoint_keys_round_trip() -> None:
    ledger = AckLedger()
    keys = [key(m, m * 7919) for m in range(1, 1000)]
    for i, k in enumerate(keys):
        ledger.add(i + 1, k, ledger.pending)
    assert keys_from_checkpoint(ledger.checkpoint(ledger.seal())) == array("Q", keys)
