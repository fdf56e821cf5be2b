"""The config tree: zot's layout, the embedded default, and errors that name their key."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry_trio.config import (
    ConfigError,
    Duration,
    load_config,
    parse_config,
    parse_duration,
)


def test_embedded_default_is_the_spec_one():
    config = load_config(None)
    assert (config.http.address, config.http.port) == ("127.0.0.1", 5000)
    assert config.storage.root_directory == "registry_data"
    assert config.extensions.events.enable
    assert config.extensions.events.queue.directory == "queue_data"
    assert config.http.auth is None and config.extensions.events.sinks == ()


def test_zot_layout_with_string_port():
    config = parse_config(
        {
            "distSpecVersion": "1.1.1",
            "http": {"address": "0.0.0.0", "port": "8080"},
            "storage": {"rootDirectory": "/tmp/zot"},
            "log": {"level": "debug"},
        }
    )
    assert config.http.port == 8080 and config.storage.root_directory == "/tmp/zot"
    assert not config.extensions.events.enable  # a file states what it wants


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("0", 0.0),
        ("1.5s", 1.5),
        ("250us", 0.00025),
    ],
)
def test_go_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"storage": {"rootDirectry": "x"}}, "storage.rootDirectry"),
        ({"http": {"port": "eighty"}}, "http.port"),
        ({"http": {"port": 70000}}, "http.port"),
        ({"http": {"trustedProxies": ["not-a-cidr"]}}, "http.trustedProxies[0]"),
        ({"log": {"level": "loud"}}, "log.level"),
        ({"log": {"format": "xml"}}, "log.format"),
        ({"storage": {"gcDelay": 5}}, "storage.gcDelay"),
        ({"storage": {"uploadPurging": {"enabled": True}}}, "storage.uploadPurging.enabled"),
        ({"storage": {"uploadPurging": {"age": 3600}}}, "storage.uploadPurging.age"),
        ({"extensions": {"events": {"enable": "yes"}}}, "extensions.events.enable"),
        (
            {
                "extensions": {
                    "events": {
                        "sinks": [
                            {"type": "http", "address": "http://a"},
                            {"type": "http", "address": "http://a"},
                        ]
                    }
                }
            },
            "extensions.events.sinks[1].name",
        ),
        (
            {"http": {"accessControl": {"repositories": {"**": {"defaultPolicy": ["fly"]}}}}},
            "http.accessControl.repositories.**.defaultPolicy[0]",
        ),
        ({"extensions": {"events": {"queue": {"type": "kafka"}}}}, "extensions.events.queue.type"),
        (
            {"extensions": {"events": {"queue": {"type": "jetstream"}}}},
            "extensions.events.queue.address",
        ),
        (
            {"extensions": {"events": {"queue": {"address": "nats://127.0.0.1:4222"}}}},
            "extensions.events.queue.address",  # sqlite (the default) takes no address
        ),
        (
            {
                "extensions": {
                    "events": {
                        "queue": {
                            "type": "jetstream",
                            "address": "nats://127.0.0.1:4222",
                            "stream": "events.all",
                        }
                    }
                }
            },
            "extensions.events.queue.stream",
        ),
        (
            {
                "extensions": {
                    "events": {
                        "queue": {
                            "type": "jetstream",
                            "address": "nats://127.0.0.1:4222",
                            "ackWait": "0s",
                        }
                    }
                }
            },
            "extensions.events.queue.ackWait",
        ),
    ],
)
def test_errors_name_the_key(doc, key):
    with pytest.raises(ConfigError) as error:
        parse_config(doc)
    assert error.value.path == key
    assert str(error.value).startswith(key + ": ")


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    """``registry-trio verify -c path``, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "registry_trio", "verify", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_verify_command_reports_the_key(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"http": {"port": "eighty"}}))
    result = verify(path)
    assert result.returncode == 2
    assert "http.port: not a port number: 'eighty'" in result.stderr
    path.write_text(json.dumps({"http": {"port": 5001}}))
    ok = verify(path)
    assert ok.returncode == 0 and "configuration is valid" in ok.stdout


def test_documented_defaults():
    """The key table of docs/configuration.md, default column, for a file that names nothing."""
    config = parse_config({})
    storage, http, log = config.storage, config.http, config.log
    assert storage.root_directory == "registry_data"
    assert (storage.gc, storage.gc_interval, storage.gc_delay) == (False, 3600.0, 3600.0)
    purging = storage.upload_purging
    assert (purging.enable, purging.age, purging.interval) == (True, 168 * 3600.0, 24 * 3600.0)
    assert (http.address, http.port) == ("127.0.0.1", 5000)
    assert http.max_manifest_size == 4194304
    assert http.graceful_timeout == 10.0
    assert (http.body_idle_timeout, http.body_min_rate) == (30.0, 1024)
    assert http.auth is None and http.access_control is None
    assert tuple(http.trusted_proxies) == ()
    assert http.tls is None
    assert (log.level, log.output, log.format) == ("info", None, "text")  # None: stderr
    events = config.extensions.events
    assert events.enable is False
    assert events.type_prefix == "zotregistry"
    assert events.shutdown_timeout == 5.0
    assert tuple(events.sinks) == ()
    queue = events.queue
    assert (queue.type, queue.directory) == ("sqlite", "queue_data")
    assert (queue.stream, queue.timeout) == ("REGISTRY_EVENTS", 5.0)
    assert (queue.replicas, queue.duplicate_window, queue.ack_wait) == (1, 120.0, 30.0)


def test_documented_sink_defaults():
    (sink,) = parse_config(
        {
            "extensions": {
                "events": {
                    "sinks": [
                        {
                            "type": "http",
                            "address": "https://hook:pw-in-url@hooks.example/registry",
                            "hmac": {"secret": "s3cret"},
                        }
                    ]
                }
            }
        }
    ).extensions.events.sinks
    # The name defaults to the address, without its credentials.
    assert sink.name == "https://hooks.example/registry"
    assert (sink.timeout, sink.format, sink.concurrency) == (5.0, "cloudevents", 1)
    retry = sink.retry
    assert (retry.initial_backoff, retry.max_backoff) == (0.5, 60.0)
    assert (retry.max_attempts, retry.max_age) == (0, 86400.0)
    assert (sink.batch.max_events, sink.batch.max_wait) == (100, 0.0)
    assert sink.filter.actions is None and sink.filter.repositories is None
    assert tuple(sink.filter.ignore_media_types) == ()
    assert sink.hmac is not None and sink.hmac.header == "X-Registry-Signature"


def test_an_empty_sink_name_is_the_default_one():
    (sink,) = parse_config(
        {"extensions": {"events": {"sinks": [{"type": "http", "address": "http://a", "name": ""}]}}}
    ).extensions.events.sinks
    assert sink.name == "http://a"


def _durations(node: object, path: str) -> Iterator[tuple[str, object]]:
    """``(key path, value)`` of every Duration-typed field under ``node``."""
    if dataclasses.is_dataclass(node):
        hints = typing.get_type_hints(type(node))
        for field in dataclasses.fields(node):
            value = getattr(node, field.name)
            if hints[field.name] is Duration:
                yield f"{path}{field.name}", value
            else:
                yield from _durations(value, f"{path}{field.name}.")
    elif isinstance(node, tuple):
        for i, item in enumerate(node):
            yield from _durations(item, f"{path[:-1]}[{i}].")


def test_duration_defaults_are_durations_as_parsed_values_are():
    config = parse_config(
        {
            "http": {"auth": {}},
            "extensions": {"events": {"sinks": [{"type": "http", "address": "http://a"}]}},
        }
    )
    durations = dict(_durations(config, ""))
    assert {"storage.gc_interval", "extensions.events.sinks[0].retry.max_age"} <= set(durations)
    assert [key for key, value in durations.items() if type(value) is not Duration] == []


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        # docs/configuration.md's own example of a start-up error.
        (
            {
                "extensions": {
                    "events": {
                        "sinks": [
                            {"type": "http", "address": "http://a"},
                            {"type": "http", "address": "http://b", "timeout": "5x"},
                        ]
                    }
                }
            },
            "extensions.events.sinks[1].timeout: invalid duration '5x'",
        ),
        (
            {
                "extensions": {
                    "events": {
                        "sinks": [
                            {"type": "http", "address": "http://a", "retry": {"maxBackof": "1s"}}
                        ]
                    }
                }
            },
            "extensions.events.sinks[0].retry.maxBackof: unknown key",
        ),
        ({"storage": {"gc": "yes"}}, "storage.gc: expected true or false"),
        ({"storage": {"gcDelay": "1d"}}, "storage.gcDelay: invalid duration '1d'"),
        ({"storage": {"gcInterval": "0s"}}, "storage.gcInterval: must be greater than zero"),
        (
            {"storage": {"uploadPurging": {"age": "0s"}}},
            "storage.uploadPurging.age: must be greater than zero",
        ),
        (
            {"storage": {"uploadPurging": {"interval": "0s"}}},
            "storage.uploadPurging.interval: must be greater than zero",
        ),
        ({"storage": {"uploadPurging": True}}, "storage.uploadPurging: expected an object"),
        ({"http": {"maxManifestSize": 1024}}, "http.maxManifestSize: must be at least 4 MiB"),
        ({"http": {"bodyIdleTimeout": "0s"}}, "http.bodyIdleTimeout: must be greater than zero"),
        ({"http": {"bodyIdleTimeout": 30}}, "http.bodyIdleTimeout: expected a duration string"),
        ({"http": {"bodyMinRate": -1}}, "http.bodyMinRate: must be 0 (no minimum) or more"),
        ({"http": {"bodyMinRate": "1KiB"}}, "http.bodyMinRate: expected an integer"),
        ({"http": {"chunkMinLength": -1}}, "http.chunkMinLength: must be 0 (not announced)"),
        ({"http": {"chunkMinLength": "5MiB"}}, "http.chunkMinLength: expected an integer"),
        ({"http": {"trustedProxies": "10.0.0.0/8"}}, "http.trustedProxies: expected a list"),
        ({"extensions": {"events": {"typePrefix": 5}}}, "extensions.events.typePrefix: expected"),
    ],
)
def test_unknown_keys_wrong_types_and_bad_durations_name_the_key_path(doc, message):
    with pytest.raises(ConfigError) as error:
        parse_config(doc)
    assert str(error.value).startswith(message), str(error.value)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"storage": {"rootDirectry": "x"}}, "storage.rootDirectry: unknown key"),
        (
            {
                "extensions": {
                    "events": {"sinks": [{"type": "http", "address": "http://a", "timeout": "5x"}]}
                }
            },
            "extensions.events.sinks[0].timeout: invalid duration '5x'",
        ),
        ({"storage": {"gc": 1}}, "storage.gc: expected true or false, got 1"),
    ],
    ids=["unknown-key", "bad-duration", "wrong-type"],
)
def test_verify_refuses_a_bad_file_naming_the_key(tmp_path, doc, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    result = verify(path)
    assert result.returncode == 2, result.stderr
    assert f"registry-trio: configuration error: {message}" in result.stderr
    assert result.stdout == ""


def test_verify_accepts_a_full_file(tmp_path):
    import bcrypt

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("alice:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode() + "\n")
    doc = {
        "distSpecVersion": "1.1.1",
        "storage": {
            "rootDirectory": str(tmp_path / "data"),
            "gc": True,
            "gcInterval": "1h",
            "gcDelay": "1h",
        },
        "http": {
            "address": "127.0.0.1",
            "port": "5000",
            "trustedProxies": ["10.0.0.0/8"],
            "auth": {"htpasswd": {"path": str(htpasswd)}},
            "accessControl": {
                "repositories": {"**": {"defaultPolicy": ["read", "create", "update"]}}
            },
        },
        "log": {"level": "info", "format": "json"},
        "extensions": {
            "events": {
                "enable": True,
                "queue": {"directory": str(tmp_path / "queue")},
                "sinks": [
                    {
                        "type": "http",
                        "address": "https://hooks.example/registry",
                        "timeout": "5s",
                        "credentials": {"token": "t"},
                        "hmac": {"secret": "s"},
                        "retry": {"initialBackoff": "500ms", "maxBackoff": "1m", "maxAge": "24h"},
                    },
                    {
                        "type": "http",
                        "name": "audit",
                        "address": "http://audit:8080/ingest",
                        "format": "distribution",
                        "batch": {"maxEvents": 100, "maxWait": "200ms"},
                        "filter": {
                            "actions": ["manifest.pushed", "manifest.deleted", "tag.deleted"]
                        },
                    },
                    {
                        "type": "nats",
                        "address": "nats://127.0.0.1:4222",
                        "channel": "registry.events",
                        "mode": "jetstream",
                    },
                ],
            }
        },
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    result = verify(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: configuration is valid"
