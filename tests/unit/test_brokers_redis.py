"""Pure parts of the Redis probe: kombu's key layout, envelopes, first-seen ages, the unacked tally."""

from __future__ import annotations

import json

import pytest

from celery_worker_operator.brokers.redis import (
    TailWatch,
    UnackedTally,
    client_url,
    priority_keys,
    routing_key_of,
    stamp_of,
)


def envelope(tag: str = "t1", headers: dict[str, object] | None = None, **properties: object) -> bytes:
    return json.dumps(
        {"body": "e30=", "headers": headers or {}, "properties": {"delivery_tag": tag, **properties}}
    ).encode()


def test_priority_keys_follow_kombu() -> None:
    assert priority_keys("q") == {0: "q", 3: "q\x06\x163", 6: "q\x06\x166", 9: "q\x06\x169"}


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("rediss://:pw@h:6380/1?ssl_cert_reqs=CERT_REQUIRED", "rediss://:pw@h:6380/1?ssl_cert_reqs=required"),
        ("rediss://h/0?ssl_cert_reqs=none", "rediss://h/0?ssl_cert_reqs=none"),
        ("redis://user:pw@h:6379/15", "redis://user:pw@h:6379/15"),
    ],
)
def test_client_url_accepts_kombu_spellings(url: str, expected: str) -> None:
    assert client_url(url) == expected


@pytest.mark.parametrize(
    ("raw", "stamp"),
    [
        (envelope(headers={"published_at": 1700000000.25}), 1700000000.25),
        (envelope(timestamp=1700000000), 1700000000.0),
        (envelope(headers={"published_at": 1700000000.25}, timestamp=1700000000), 1700000000.25),
        (envelope(), None),
        (envelope(headers={"published_at": "yesterday"}), None),
        (b"not json", None),
        (b"[1, 2]", None),
    ],
)
def test_stamp_of_envelopes(raw: bytes, stamp: float | None) -> None:
    assert stamp_of(raw) == stamp


@pytest.mark.parametrize(
    ("value", "key"),
    [(json.dumps([{"body": "x"}, "q", "q"]).encode(), "q"), (b"[1, 2]", ""), (b"{", ""), (b'[{}, "ex", 7]', "")],
)
def test_routing_key_of_unacked_values(value: bytes, key: str) -> None:
    assert routing_key_of(value) == key


def test_unstamped_tails_are_aged_from_first_sight_until_they_change() -> None:
    watch = TailWatch()
    assert watch.age("q", envelope("m1"), 10.0) == (0.0, True)
    assert watch.age("q", envelope("m1"), 15.0) == (5.0, True)
    assert watch.age("q", envelope("m2"), 16.0) == (0.0, True)  # m1 was consumed: m2 is known since now
    assert watch.age("other", envelope("m1"), 16.0) == (0.0, True)  # lists are watched apart
    watch.forget("q")
    assert watch.age("q", envelope("m2"), 20.0) == (0.0, True)


def test_stamped_tails_have_exact_ages() -> None:
    watch = TailWatch()
    stamped = envelope(headers={"published_at": 100.0})
    assert watch.age("q", stamped, 104.5) == (4.5, False)
    assert watch.age("q", stamped, 106.0) == (6.0, False)
    assert watch.age("q", stamped, 99.0) == (0.0, False)  # clock skew never makes a negative age


def test_unacked_tally_learns_each_tag_once_and_drops_acked_ones() -> None:
    tally = UnackedTally()
    tally.seen([b"a", b"b", b"c"])
    assert sorted(tally.unknown(limit=10)) == [b"a", b"b", b"c"]
    tally.learn(b"a", "q1")
    tally.learn(b"b", "q2")
    tally.learn(b"c", None)  # acknowledged before its value was read
    tally.end_cycle()
    assert tally.counts() == {"q1": 1, "q2": 1}
    tally.seen([b"a", b"d"])  # b was acknowledged since
    assert tally.unknown(limit=10) == [b"d"]
    tally.learn(b"d", "q1")
    assert tally.counts() == {"q1": 2, "q2": 1}  # mid-cycle: b is still counted
    tally.end_cycle()
    assert tally.counts() == {"q1": 2}


def test_unacked_tally_caps_what_it_fetches_per_poll() -> None:
    tally = UnackedTally()
    tally.seen([str(n).encode() for n in range(50)])
    assert len(tally.unknown(limit=20)) == 20
