"""The brokers the suite relies on are real and usable through the libraries the operator uses."""

from __future__ import annotations

import json
import urllib.request
import uuid
from urllib.parse import urlsplit

import pika
import redis
from kombu import Connection


def test_redis_answers_and_stores(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    key = f"cwo-test-{uuid.uuid4().hex}"
    assert client.ping()
    client.lpush(key, b"one", b"two")
    assert client.llen(key) == 2
    client.delete(key)


def test_rabbitmq_counts_what_was_published(amqp_url: str) -> None:
    parts = urlsplit(amqp_url)
    credentials = pika.PlainCredentials(parts.username or "guest", parts.password or "guest")
    parameters = pika.ConnectionParameters(parts.hostname, parts.port or 5672, "/", credentials)
    connection = pika.BlockingConnection(parameters)
    channel = connection.channel()
    channel.confirm_delivery()  # each publish is routed before the count below is asked for
    queue = f"cwo-test-{uuid.uuid4().hex}"
    channel.queue_declare(queue, auto_delete=False)
    for body in (b"a", b"b", b"c"):
        channel.basic_publish("", queue, body)
    declared = channel.queue_declare(queue, passive=True)
    assert declared.method.message_count == 3
    channel.queue_delete(queue)
    connection.close()


def test_rabbitmq_management_api_lists_the_vhost(management_url: str) -> None:
    parts = urlsplit(management_url)
    request = urllib.request.Request(f"{parts.scheme}://{parts.hostname}:{parts.port}/api/vhosts")
    manager = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    manager.add_password(None, request.full_url, parts.username or "", parts.password or "")
    opener = urllib.request.build_opener(urllib.request.HTTPBasicAuthHandler(manager))
    with opener.open(request, timeout=10) as response:
        vhosts = [v["name"] for v in json.load(response)]
    assert "/" in vhosts


def test_kombu_round_trip_on_both_brokers(redis_url: str, amqp_url: str) -> None:
    """Celery's own transport layer (kombu, with `packaging` for Redis) moves a message on each."""
    for url in (redis_url, amqp_url):
        name = f"cwo-test-{uuid.uuid4().hex}"
        with Connection(url) as connection:
            queue = connection.SimpleQueue(name)
            queue.put({"hello": url.split(":")[0]})
            message = queue.get(timeout=5)
            assert message.payload == {"hello": url.split(":")[0]}
            message.ack()
            queue.close()
            connection.default_channel.queue_delete(name)
