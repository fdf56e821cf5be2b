"""Failed htpasswd logins: no user names leaked by timing, a per-client limit, fair bcrypt.

Real bcrypt on real htpasswd files and real servers; a second client address is another
loopback address (127.0.0.2). Times are compared with each other (medians), never with
absolute figures: the machine is shared and noisy.
"""

from __future__ import annotations

import base64
import functools
import itertools
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import bcrypt
import httpx
import pytest
import trio

from registry_trio.auth import Authenticator, TooManyFailedLogins, Unauthorized
from registry_trio.auth.login_limits import client_key
from registry_trio.config import Config, ConfigError, parse_config
from tests.api_helpers import assert_oci_error
from tests.conftest import make_config, start_registry

# About 0.1 s a check here: it dominates a request's time, as the default cost 12 does.
COST = 11
USERS = {f"user{i}": f"user{i}-password" for i in range(8)}


@functools.cache
def htpasswd_lines() -> str:
    return "".join(
        f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=COST)).decode()}\n"
        for user, pw in USERS.items()
    )


def limited_config(tmp_path: Path, **failed_logins: object) -> Config:
    path = tmp_path / "htpasswd"
    path.write_text(htpasswd_lines())
    auth = {"htpasswd": {"path": str(path)}, "failedLogins": failed_logins}
    return make_config(tmp_path, http={"auth": auth})


@asynccontextmanager
async def client_from(address: str, url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose connections come from ``address`` (any of 127.0.0.0/8 works)."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=30) as http:
        yield http


async def login_seconds(http: httpx.AsyncClient, user: str, password: str, status: int) -> float:
    started = time.perf_counter()
    response = await http.get("/v2/", auth=(user, password))
    seconds = time.perf_counter() - started
    assert response.status_code == status, response.text
    return seconds


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_unknown_and_known_users_take_as_long_to_refuse(nursery, tmp_path):
    registry = await start_registry(nursery, limited_config(tmp_path, limit=1000))
    known: list[float] = []
    unknown: list[float] = []
    async with client_from("127.0.0.1", registry.url) as http:
        for attempt in range(7):  # interleaved, so load on the machine hits both alike
            known.append(await login_seconds(http, "user0", f"wrong-{attempt}", 401))
            unknown.append(await login_seconds(http, f"nobody{attempt}", "wrong", 401))
    ratio = statistics.median(unknown) / statistics.median(known)
    assert 0.5 < ratio < 2, (known, unknown)


async def test_failed_login_limit_engages_without_bcrypt_and_expires(tmp_path):
    now = 1000.0
    config = limited_config(tmp_path, limit=3, window="1m")
    auth = Authenticator(config.http, clock=lambda: now)
    for attempt in range(3):
        with pytest.raises(Unauthorized):
            await auth.authenticate(
                basic("user0", f"wrong-{attempt}"), f"192.0.2.7:{5000 + attempt}"
            )
    started = time.perf_counter()
    await auth.authenticate(basic("user1", USERS["user1"]), "192.0.2.8:5000")  # another client
    one_check = time.perf_counter() - started

    # The right password is refused too, from any port of that address, and at once: no
    # bcrypt check is run for a refused client.
    started = time.perf_counter()
    with pytest.raises(TooManyFailedLogins) as refused:
        await auth.authenticate(basic("user0", USERS["user0"]), "192.0.2.7:6000")
    assert time.perf_counter() - started < one_check / 10
    assert refused.value.retry_after == 60

    now += 59
    with pytest.raises(TooManyFailedLogins) as refused:
        await auth.authenticate(basic("user0", USERS["user0"]), "192.0.2.7:6001")
    assert refused.value.retry_after == 1
    now += 1  # the oldest failure leaves the window
    who = await auth.authenticate(basic("user0", USERS["user0"]), "192.0.2.7:6002")
    assert who.name == "user0"


async def test_too_many_failed_logins_get_429_with_retry_after(nursery, tmp_path):
    registry = await start_registry(nursery, limited_config(tmp_path, limit=3, window="1m"))
    async with client_from("127.0.0.1", registry.url) as http:
        for attempt in range(3):
            await login_seconds(http, "user0", f"wrong-{attempt}", 401)
        refused = await http.get("/v2/", auth=("user0", USERS["user0"]))
        entry = assert_oci_error(refused, 429, "TOOMANYREQUESTS")
        assert "too many failed logins" in str(entry["message"])
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
    async with client_from("127.0.0.2", registry.url) as other:
        await login_seconds(other, "user0", USERS["user0"], 200)


async def test_a_first_login_is_not_starved_by_bad_logins_from_another_address(nursery, tmp_path):
    registry = await start_registry(nursery, limited_config(tmp_path, limit=1000))
    async with (
        client_from("127.0.0.1", registry.url) as good,
        client_from("127.0.0.2", registry.url) as attacker,
    ):
        alone = [await login_seconds(good, f"user{i}", USERS[f"user{i}"], 200) for i in (1, 2, 3)]

        guesses = itertools.count()
        refused = 0
        under_way = trio.Event()

        async def guess() -> None:
            nonlocal refused
            while True:
                await login_seconds(attacker, "user0", f"guess-{next(guesses)}", 401)
                refused += 1
                if refused >= 2:
                    under_way.set()

        async with trio.open_nursery() as attack:
            for _ in range(16):  # 16 bad logins at a time, each a different password
                attack.start_soon(guess)
            await under_way.wait()
            attacked = [
                await login_seconds(good, f"user{i}", USERS[f"user{i}"], 200) for i in (4, 5, 6)
            ]
            attack.cancel_scope.cancel()
    assert statistics.median(attacked) < 3 * statistics.median(alone), (alone, attacked)


def test_a_client_is_its_address_without_the_port_and_ipv6_by_its_64():
    assert client_key("192.0.2.7:5000") == client_key("192.0.2.7:6000") == "192.0.2.7"
    assert client_key("[2001:db8:1:2::7]:5000") == "2001:db8:1:2::/64"
    assert client_key("[2001:db8:1:2:ffff::1]:1") == "2001:db8:1:2::/64"
    assert client_key("[2001:db8:1:3::7]:5000") == "2001:db8:1:3::/64"
    assert client_key("[::ffff:192.0.2.7]:5000") == "192.0.2.7"
    assert client_key("198.51.100.1") == "198.51.100.1"  # forwarded: no port


@pytest.mark.parametrize(
    ("failed_logins", "key", "reason"),
    [
        ({"limit": 0}, "limit", "between 1 and 1000000"),
        ({"limit": "10"}, "limit", "expected an integer"),
        ({"window": "0s"}, "window", "greater than zero"),
        ({"window": 60}, "window", "duration"),
        ({"tries": 3}, "tries", "unknown key"),
    ],
)
def test_failed_logins_config_is_checked(failed_logins, key, reason):
    auth = {"failedLogins": failed_logins}
    with pytest.raises(ConfigError, match=rf"http\.auth\.failedLogins\.{key}: .*{reason}"):
        parse_config({"http": {"auth": auth}})
