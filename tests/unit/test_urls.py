"""Credentials put into broker URLs: the operator's encoded URL and the pod's raw `$(VAR)` URL must
log in with the same user name and password, as kombu and redis-py read them."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kombu.utils.url import parse_url as kombu_parse_url
from kombu.utils.url import url_to_parts
from redis.connection import parse_url

from celery_worker_operator.urls import (
    PASSWORD_ENV,
    UNSAFE,
    UNSAFE_IN_USERNAME,
    USERNAME_ENV,
    fits_raw_in_url,
    tls_settings,
    with_credentials,
    with_tls,
)
from tests.support.kubelet import expand

URLS = ["redis://redis:6379/0", "amqp://rabbit:5672/vhost", "rediss://h:6380/1?ssl_cert_reqs=required"]


@pytest.mark.parametrize(
    ("url", "username", "password", "expected"),
    [
        ("redis://h:6379/0", None, "p@ss:w/rd", "redis://:p%40ss%3Aw%2Frd@h:6379/0"),
        ("amqp://app@rabbit//", None, "pw", "amqp://app:pw@rabbit//"),  # the URL's own user name kept
        ("amqp://old@rabbit//", "new", "pw", "amqp://new:pw@rabbit//"),
        ("redis://h?db=1", "u", None, "redis://u@h?db=1"),
        ("sentinel://a:26379;sentinel://b:26379", None, "pw", "sentinel://:pw@a:26379;sentinel://:pw@b:26379"),
    ],
)
def test_credentials_go_into_every_url(url: str, username: str | None, password: str | None, expected: str) -> None:
    assert with_credentials(url, username, password) == expected


def logins(url: str) -> set[tuple[str | None, str | None]]:
    """(user name, password) as kombu reads `url`, and as redis-py does for a Redis URL."""
    kombu = url_to_parts(url)
    found = {(kombu.username, kombu.password)}
    if url.startswith("redis"):
        redis_py = parse_url(url)
        found.add((redis_py.get("username"), redis_py.get("password")))
    return found


# Printable text without the characters refused (a refused value never makes a URL, see secrets.py),
# with the URL-special characters a raw value may hold drawn often.
HIDDEN = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")
password = st.text(
    st.characters(exclude_categories=HIDDEN, exclude_characters=UNSAFE).filter(fits_raw_in_url)
    | st.sampled_from("@:!$&'()*+,=~$(){}"),
    min_size=1,
)
username = st.text(
    st.characters(exclude_categories=HIDDEN, exclude_characters=UNSAFE_IN_USERNAME).filter(
        lambda c: fits_raw_in_url(c, username=True)
    )
    | st.sampled_from("!$&'()*+,=~"),
    min_size=1,
)


@given(url=st.sampled_from(URLS), username=username, password=password)
def test_pod_and_operator_urls_log_in_alike(url: str, username: str, password: str) -> None:
    assert fits_raw_in_url(username, username=True) and fits_raw_in_url(password)
    operator_url = with_credentials(url, username, password)
    pod_template = with_credentials(url, f"$({USERNAME_ENV})", f"$({PASSWORD_ENV})", encode=False)
    pod_url = expand(pod_template, {USERNAME_ENV: username, PASSWORD_ENV: password})
    assert logins(operator_url) == logins(pod_url) == {(username, password)}


@pytest.mark.parametrize(
    "password", ["a/b", "50%", "a;b", "a b", "x?y", "x#y", "[v6]", "tab\t", "a\ufe55b", "a\uff0fb"]
)
def test_values_a_raw_url_cannot_carry_are_refused(password: str) -> None:
    assert not fits_raw_in_url(password)


def test_user_names_may_not_hold_the_userinfo_separators() -> None:
    assert fits_raw_in_url("a:b@c")
    assert not fits_raw_in_url("a:b", username=True)
    assert not fits_raw_in_url("a@b", username=True)


def test_tls_settings_verify_the_server_and_name_only_the_files_given() -> None:
    assert tls_settings("/t/ca.pem", None, None) == {"ssl_cert_reqs": "required", "ssl_ca_certs": "/t/ca.pem"}
    assert tls_settings(None, "/t/c.pem", "/t/k.pem") == {
        "ssl_cert_reqs": "required",
        "ssl_certfile": "/t/c.pem",
        "ssl_keyfile": "/t/k.pem",
    }


@pytest.mark.parametrize("url", ["rediss://h:6380/1", "rediss://u@h:6380/1?health_check_interval=10"])
def test_tls_settings_in_a_url_are_read_by_kombu_and_redis_py(url: str) -> None:
    settings = tls_settings("/t/ca.pem", "/t/c.pem", "/t/k.pem")
    with_files = with_tls(url, settings)
    assert {k: v for k, v in parse_url(with_files).items() if k.startswith("ssl_")} == settings
    kombu_ssl = kombu_parse_url(with_files)["ssl"]
    assert kombu_ssl == {**settings, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert parse_url(with_files)["db"] == 1


def test_tls_settings_go_into_every_url_of_a_failover_list() -> None:
    url = with_tls("rediss://a:6380/0;rediss://b:6380/0", {"ssl_cert_reqs": "required"})
    assert url == "rediss://a:6380/0?ssl_cert_reqs=required;rediss://b:6380/0?ssl_cert_reqs=required"
