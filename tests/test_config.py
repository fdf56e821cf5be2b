"""The config tree: zot's layout, the embedded default, and errors that name their key."""

from __future__ import annotations

import json
import sys

import pytest

from registry_trio.config import ConfigError, load_config, parse_config, parse_duration


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


def test_verify_command_reports_the_key(tmp_path):
    import subprocess

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"http": {"port": "eighty"}}))
    result = subprocess.run(
        [sys.executable, "-m", "registry_trio", "verify", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "http.port: not a port number: 'eighty'" in result.stderr
    path.write_text(json.dumps({"http": {"port": 5001}}))
    ok = subprocess.run(
        [sys.executable, "-m", "registry_trio", "verify", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0 and "configuration is valid" in ok.stdout
