"""Redis probe: Celery's queue numbers from kombu's Redis layout, in one pipelined round trip.

kombu keeps a queue as up to four lists (`name`, `name\\x06\\x163`, `\\x06\\x166`, `\\x06\\x169`: priority
buckets, 0 = served first), LPUSHes new messages and BRPOPs the oldest from the tail. A message a
worker has prefetched leaves the lists for the `unacked` hash (tag -> JSON `[envelope, exchange,
routing_key]`), indexed by the `unacked_index` zset. Counting one list, as most tools do, misses the
priority buckets and every prefetched task. Apps may change the buckets, the separator and add a
prefix to every key (`broker_transport_options`): the key names come from kombu's own channel code
for the options the pool gives (`KeyLayout`).
"""

from __future__ import annotations

import hashlib
import json
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from kombu.transport.redis import Channel
from kombu.utils.url import url_to_parts
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError
from redis.retry import Retry
from redis.sentinel import Sentinel

from celery_worker_operator.brokers.base import BrokerAuthFailed, BrokerUnavailable, QueueStats
from celery_worker_operator.brokers.commands import CLIENT_NAME
from celery_worker_operator.instrument import published_at
from celery_worker_operator.redact import url_secrets
from celery_worker_operator.spec import TransportOptions

PRIORITY_STEPS = tuple(Channel.priority_steps)
SEP = Channel.sep
UNACKED = Channel.unacked_key
UNACKED_INDEX = Channel.unacked_index_key
POOL_WAIT_SECONDS = 30.0  # the longest a caller waits for the shared command connection (a slow broker's turn)
_CERT_REQS = {"cert_none": "none", "cert_optional": "optional", "cert_required": "required"}
# OpenSSL reasons that mean a certificate or key is wrong (theirs or ours), not that the network is.
_CERTIFICATE_REASONS = ("CERTIFICATE", "UNKNOWN_CA", "PEM_LIB", "KEY_VALUES_MISMATCH")


@dataclass(frozen=True)
class KeyLayout:
    """Where kombu's Redis channel keeps a queue, for the transport options an app sets.

    `_q_for_pri` and `priority` are kombu's own methods, run on these fields, so the keys are the
    ones the workers BRPOP; kombu's global_keyprefix client prefixes every key it sends the same way.
    """

    priority_steps: tuple[int, ...] = PRIORITY_STEPS
    sep: str = SEP
    global_keyprefix: str = ""

    @classmethod
    def of(cls, options: TransportOptions | None) -> KeyLayout:
        if options is None:
            return cls()
        steps = tuple(options.priority_steps) if options.priority_steps is not None else PRIORITY_STEPS
        return cls(steps, SEP if options.sep is None else options.sep, options.global_keyprefix or "")

    priority = Channel.priority
    _q_for_pri = Channel._q_for_pri

    def priority_keys(self, queue: str) -> dict[int, str]:
        """The list key of each priority bucket of `queue`, prefixed (as kombu's `_size` walks them)."""
        keys: dict[str, int] = {}
        for step in self.priority_steps:
            keys.setdefault(self.global_keyprefix + self._q_for_pri(queue, step), step)  # type: ignore[misc,no-untyped-call]
        return {step: key for key, step in keys.items()}

    @property
    def unacked(self) -> str:
        return self.global_keyprefix + UNACKED

    @property
    def unacked_index(self) -> str:
        return self.global_keyprefix + UNACKED_INDEX


DEFAULT_LAYOUT = KeyLayout()


def priority_keys(queue: str) -> dict[int, str]:
    """The list key of each priority bucket of `queue` in kombu's default layout."""
    return DEFAULT_LAYOUT.priority_keys(queue)


def client_url(url: str) -> str:
    """`url` as redis-py reads it: kombu also accepts `ssl_cert_reqs=CERT_REQUIRED`, redis-py only `required`."""
    parts = urlsplit(url)
    query = [(k, _CERT_REQS.get(v.lower(), v) if k == "ssl_cert_reqs" else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def command_pool(url: str, master_name: str | None, timeout: float) -> redis.ConnectionPool:
    """The pool of the broker's one command connection: the probe and the operator's kombu channels
    (kombu_redis.py) share it, and a caller waits for the connection rather than open a second one.

    Celery's `sentinel://a:26379;sentinel://b:26379/0` asks those sentinels for master `master_name`
    on each connection (redis-py's Sentinel, as kombu's sentinel transport does), so a failover is
    followed; the URL's password and DB are the master's, as in kombu. redis-py has no blocking
    Sentinel pool: there, callers that meet open a connection each."""
    # One retry, at once: it replaces a pooled connection the server dropped; more would only
    # delay the BrokerUnavailable the caller needs to hold its pools.
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 1),
        "client_name": CLIENT_NAME,
    }
    if urlsplit(url).scheme != "sentinel":
        pool: redis.ConnectionPool = redis.BlockingConnectionPool.from_url(
            client_url(url), max_connections=1, timeout=POOL_WAIT_SECONDS, **options
        )
        return pool
    if master_name is None:
        raise ValueError("a sentinel:// broker needs transportOptions.master_name")
    parts = [url_to_parts(part) for part in url.split(";")]
    hosts = [(p.hostname or "127.0.0.1", p.port or 26379) for p in parts]
    sentinel = Sentinel(hosts, sentinel_kwargs=options)  # type: ignore[no-untyped-call]
    first = parts[0]
    master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        master_name, db=int(first.path or 0), username=first.username, password=first.password, **options
    )
    return master.connection_pool


def tls_trouble(error: BaseException) -> tuple[bool, str]:
    """(refused for good, what to say first) when `error` comes from a TLS connection: a certificate
    or key the handshake refused is a Secret to fix, which retrying will not; a connection the broker
    closes right after the handshake is what a broker that wants a client certificate does when it
    gets none and its alert loses the race with our first command."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLError) and any(word in (cause.reason or "") for word in _CERTIFICATE_REASONS):
            return True, "TLS certificate refused (see broker.tls)"
        if isinstance(cause, ssl.SSLEOFError) or "EOF occurred in violation of protocol" in str(cause):
            return False, "the broker closed the TLS connection (does it want a client certificate? see broker.tls)"
        cause = cause.__cause__ or cause.__context__
    return False, ""


def stamp_of(raw: bytes) -> float | None:
    """The publish stamp of a kombu envelope (see instrument.py), or None."""
    envelope = _json_object(raw)
    return published_at(_object(envelope.get("headers")), _object(envelope.get("properties")))


def routing_key_of(value: bytes | str) -> str:
    """The routing key of an `unacked` hash value (`[envelope, exchange, routing_key]`), or ''."""
    try:
        entry = json.loads(value)
    except ValueError:
        return ""
    return entry[2] if isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], str) else ""


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        return _object(json.loads(raw))
    except ValueError:
        return {}


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class TailWatch:
    """Each list's tail message as last seen: parsed once, and timed from when it reached the tail.

    A backlog's tail stays put across polls, so its envelope is decoded once, not every poll. For a
    message without a publish stamp, "first seen at the tail" is all we know: a lower bound of its
    age that tightens the longer the probe watches. Messages are kept as digests, so memory stays
    small whatever their size.
    """

    def __init__(self) -> None:
        self._tails: dict[str, tuple[bytes, float | None, float]] = {}

    def age(self, key: str, raw: bytes, now: float) -> tuple[float, bool]:
        """(age in seconds, is_lower_bound) of the message `raw` now at the tail of list `key`."""
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        known = self._tails.get(key)
        if known is None or known[0] != digest:
            known = (digest, stamp_of(raw), now)
            self._tails[key] = known
        _, stamp, since = known
        if stamp is not None:
            return max(0.0, now - stamp), False
        return now - since, True

    def forget(self, key: str) -> None:
        self._tails.pop(key, None)


class UnackedTally:
    """Which queue each prefetched message belongs to, learned once per delivery tag.

    `unacked` values are whole messages, so they are fetched once per tag and cached; the tag index
    is scanned in pages, and a scan cycle may span polls on a huge backlog. Tags not seen again by
    the end of a cycle were acknowledged and are dropped.
    """

    def __init__(self) -> None:
        self._queue_of: dict[bytes, str] = {}
        self._cycle: set[bytes] = set()

    def seen(self, tags: Iterable[bytes]) -> None:
        self._cycle.update(tags)

    def unknown(self, limit: int) -> list[bytes]:
        return [tag for tag in self._cycle if tag not in self._queue_of][:limit]

    def learn(self, tag: bytes, routing_key: str | None) -> None:
        """Record a tag's queue; None means the message was acknowledged before we read it."""
        if routing_key is None:
            self._cycle.discard(tag)
        else:
            self._queue_of[tag] = routing_key

    def end_cycle(self) -> None:
        self._queue_of = {tag: key for tag, key in self._queue_of.items() if tag in self._cycle}
        self._cycle = set()

    def counts(self) -> Counter[str]:
        return Counter(self._queue_of.values())


class RedisProbe:
    """QueueProbe for Celery on Redis (`redis://`, `rediss://`, `sentinel://`, user/password, DB index),
    on the connection of `pool` when given (shared), else on one of its own."""

    def __init__(
        self,
        url: str,
        *,
        layout: KeyLayout = DEFAULT_LAYOUT,
        master_name: str | None = None,
        pool: redis.ConnectionPool | None = None,
        timeout: float = 5.0,
        scan_page: int = 1000,
        scan_pages_per_poll: int = 10,
        learn_per_poll: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._layout = layout
        self._secrets = url_secrets(url)
        self._client = redis.Redis(connection_pool=pool or command_pool(url, master_name, timeout))
        self._own_pool = pool is None
        self._scan_page, self._scan_pages, self._learn_limit = scan_page, scan_pages_per_poll, learn_per_poll
        self._clock = clock
        self._lock = threading.Lock()
        self._cursor = 0
        self._tally = UnackedTally()
        self._tails = TailWatch()

    def stats(self, queues: Iterable[str]) -> dict[str, QueueStats]:
        names = list(dict.fromkeys(queues))
        with self._lock:
            try:
                return self._measure(names)
            except (RedisError, OSError) as error:
                refused, hint = tls_trouble(error)
                reason = f"{hint + ': ' if hint else ''}{type(error).__name__}: {error}"
                kind = BrokerAuthFailed if refused or isinstance(error, AuthenticationError) else BrokerUnavailable
                raise kind(self._url, reason, self._secrets) from None

    def close(self) -> None:
        """Close the connection unless it is shared (its owner closes it)."""
        if self._own_pool:
            self._client.connection_pool.disconnect()

    def _measure(self, names: list[str]) -> dict[str, QueueStats]:
        pipe = self._client.pipeline(transaction=False)
        layouts = {name: self._layout.priority_keys(name) for name in names}
        for keys in layouts.values():
            for key in keys.values():
                pipe.llen(key)
                pipe.lindex(key, -1)
        pipe.zscan(self._layout.unacked_index, self._cursor, count=self._scan_page)
        replies = pipe.execute()
        now = self._clock()
        self._follow_unacked(replies.pop())
        reserved = self._tally.counts()
        stats, start = {}, 0
        for name, keys in layouts.items():
            end = start + 2 * len(keys)
            stats[name] = self._queue_stats(name, keys, replies[start:end], reserved[name], now)
            start = end
        return stats

    def _queue_stats(
        self, name: str, keys: dict[int, str], replies: Sequence[Any], reserved: int, now: float
    ) -> QueueStats:
        priorities: dict[int, int] = {}
        ages: list[tuple[float, bool]] = []
        for (step, key), depth, tail in zip(keys.items(), replies[0::2], replies[1::2], strict=True):
            priorities[step] = depth
            if tail is None:
                self._tails.forget(key)
            else:
                ages.append(self._tails.age(key, tail, now))
        return QueueStats(
            name=name,
            depth=sum(priorities.values()),
            reserved=reserved,
            consumers=None,
            oldest_age_seconds=max((age for age, _ in ages), default=0.0),
            priorities=priorities,
            oldest_age_is_lower_bound=any(bound for _, bound in ages),
        )

    def _follow_unacked(self, first_page: tuple[int, Sequence[tuple[bytes, float]]]) -> None:
        """Advance the scan of prefetched tags by a bounded number of pages and learn new tags."""
        cursor, page = first_page
        self._tally.seen(tag for tag, _ in page)
        for _ in range(self._scan_pages - 1):
            if not cursor:
                break
            cursor, page = self._client.zscan(self._layout.unacked_index, cursor, count=self._scan_page)  # type: ignore[assignment]
            self._tally.seen(tag for tag, _ in page)
        unknown = self._tally.unknown(self._learn_limit)
        if unknown:
            for tag, value in zip(unknown, self._client.hmget(self._layout.unacked, unknown), strict=True):
                self._tally.learn(tag, None if value is None else routing_key_of(value))
        if not cursor:
            self._tally.end_cycle()
        self._cursor = cursor
