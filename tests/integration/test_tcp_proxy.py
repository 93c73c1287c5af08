"""The chaos suite's TCP proxy remembers what a server sent just before a cut: what the network-cut
scenario uses to tell a message kombu's Redis transport lost in a dropped BRPOP reply from one lost
any other way."""

from __future__ import annotations

import time
import uuid
from urllib.parse import urlsplit

import redis

from tests.support.tcp_proxy import RECENT_SECONDS, TcpProxy


def test_a_reply_sent_just_before_a_cut_is_remembered_and_an_older_one_is_not(redis_url: str) -> None:
    parts = urlsplit(redis_url)
    db = int(parts.path.lstrip("/") or 0)
    key, old, recent = (f"cwo-proxy-{uuid.uuid4().hex}" for _ in range(3))
    direct = redis.Redis.from_url(redis_url)
    with TcpProxy((parts.hostname or "127.0.0.1", parts.port or 6379)) as proxy:
        relayed = redis.Redis(host="127.0.0.1", port=proxy.port, db=db)
        direct.lpush(key, old)
        assert relayed.brpop([key], timeout=1) == (key.encode(), old.encode())
        time.sleep(RECENT_SECONDS + 0.5)
        direct.lpush(key, recent)
        assert relayed.brpop([key], timeout=1) == (key.encode(), recent.encode())
        proxy.cut()
        assert proxy.sent_just_before_a_cut(recent.encode())
        assert not proxy.sent_just_before_a_cut(old.encode())
        assert not proxy.sent_just_before_a_cut(uuid.uuid4().hex.encode())
        relayed.close()
    direct.delete(key)
