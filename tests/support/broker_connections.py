"""The broker connections a process holds, by the name the operator gives them, counted on the brokers.

The operator names its connections (Redis CLIENT SETNAME, RabbitMQ's `connection_name` client
property: `celery-worker-operator` for commands, `...-events` for the event stream). Other operators
and tests on the shared brokers use the same names, so a connection counts only when its client port
is one of the process's own TCP sockets (/proc), as the scale benchmark counts the operator's.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import redis

from celery_worker_operator.brokers.commands import CLIENT_NAME
from tests.support.rabbitmq_admin import management_call


def tcp_connections(pid: int | None = None) -> dict[int, int]:
    """Local port -> remote port of each established TCP connection of process `pid` (this one by default)."""
    pid = pid or os.getpid()
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and fields[3] == "01":  # ESTABLISHED
                ports[int(fields[1].rsplit(":", 1)[1], 16)] = int(fields[2].rsplit(":", 1)[1], 16)
    return ports


def redis_connections(url: str, db: int) -> Counter[str]:
    """The operator's connections of this process to Redis DB `db`, by name and last command."""
    ports, found = tcp_connections(), Counter[str]()
    client = redis.Redis.from_url(url)
    try:
        for entry in client.client_list():
            port = int(entry["addr"].rsplit(":", 1)[1])
            if port in ports and int(entry["db"]) == db and entry["name"].startswith(CLIENT_NAME):
                found[f"{entry['name']} ({entry['cmd']})"] += 1
    finally:
        client.close()
    return found


def rabbitmq_connections(management_url: str, vhost: str) -> Counter[str]:
    """The operator's connections of this process to RabbitMQ vhost `vhost`, by name and channels."""
    ports, found = tcp_connections(), Counter[str]()
    path = f"/api/vhosts/{quote(vhost, safe='')}/connections?columns=peer_port,client_properties,channels"
    for connection in management_call(management_url, "GET", path) or []:
        name = (connection.get("client_properties") or {}).get("connection_name", "")
        if connection["peer_port"] in ports and name.startswith(CLIENT_NAME):
            found[f"{name} ({connection.get('channels', '?')} channels)"] += 1
    return found
