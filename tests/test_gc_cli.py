"""GC as operators run it: the `registry-trio gc` command and the periodic task."""

from __future__ import annotations

import json
import logging
import sys

import httpx
import trio

from bench.registry_client import RegistryClient, make_image
from registry_trio.events.queue import OutboxReader
from tests.conftest import events_config, make_config, start_registry
from tests.test_gc import age
from tests.waiting import eventually


async def gc_cli(config, *args):
    result = await trio.run_process(
        [sys.executable, "-m", "registry_trio", "gc", "-c", str(config), "--json", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def blob_files(root):
    return {p.name for p in (root / "blobs").rglob("*") if p.is_file()}


async def test_gc_command_removes_garbage_and_queues_events(nursery, tmp_path, sink):
    config = events_config(tmp_path, {"type": "http", "address": sink.url, "name": "s"})
    registry = await start_registry(nursery, config)
    kept, dropped = make_image((700,)), make_image((900,))
    async with httpx.AsyncClient(base_url=registry.url) as http:
        client = RegistryClient(registry.url, client=http)
        await client.push_image("gc/app", "kept", kept)
        await client.push_image("gc/app", "dropped", dropped)
        assert (await http.delete("/v2/gc/app/manifests/dropped")).status_code == 202
    await sink.wait_for(lambda evs: len(evs) == 8)  # 2 x (2 blobs + manifest), created, tag
    # Received is not yet acknowledged: stop only once the queue holds nothing pending.
    reader = OutboxReader(tmp_path / "queue_data" / "events.db")
    try:
        await eventually(lambda: reader.counts("s"), lambda counts: counts.pending == 0)
    finally:
        reader.close()
    registry.shutdown.set()

    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "storage": {"rootDirectory": str(registry.root), "gcDelay": "0s"},
                "extensions": {
                    "events": {
                        "enable": True,
                        "queue": {"directory": str(tmp_path / "queue_data")},
                        "sinks": [{"type": "http", "address": sink.url, "name": "s"}],
                    }
                },
            }
        )
    )
    dry = await gc_cli(path, "--dry-run")
    planned = dry
    assert {b["digest"] for b in planned["blobs"]} >= {
        dropped.layers[0].digest,
        dropped.config.digest,
    }
    assert dropped.layers[0].digest.split(":")[1] in blob_files(registry.root)

    run = await gc_cli(path)
    done = run
    assert done["manifests"] == planned["manifests"] and done["blobs"] == planned["blobs"]
    files = blob_files(registry.root)
    assert dropped.layers[0].digest.split(":")[1] not in files
    assert kept.layers[0].digest.split(":")[1] in files

    reader = OutboxReader(tmp_path / "queue_data" / "events.db")
    try:
        counts = await reader.counts("s")
    finally:
        reader.close()
    # The deletions wait in the queue for the next server start, like any other event.
    expected = len(done["manifests"]) + sum(len(b["repositories"]) for b in done["blobs"])
    assert expected >= 2 and counts.pending == expected


async def test_periodic_gc_runs_in_the_server(nursery, tmp_path, sink):
    # With gcDelay 0s a run landing between the blob uploads and the manifest PUT collects
    # the layers and fails the push. The delay protects the push, as it does in production;
    # the garbage is then made older than the delay.
    config = make_config(
        tmp_path,
        storage={
            "rootDirectory": str(tmp_path / "registry_data"),
            "gc": True,
            "gcInterval": "100ms",
            "gcDelay": "1h",
        },
        extensions={
            "events": {
                "enable": True,
                "queue": {"directory": str(tmp_path / "queue_data")},
                "sinks": [{"type": "http", "address": sink.url}],
            }
        },
    )
    registry = await start_registry(nursery, config)
    image = make_image((600,))
    async with httpx.AsyncClient(base_url=registry.url) as http:
        await RegistryClient(registry.url, client=http).push_image("pgc/app", "v1", image)
        assert (await http.delete(f"/v2/pgc/app/manifests/{image.digest}")).status_code == 202
    layer = image.layers[0].digest.split(":")[1]
    assert layer in blob_files(registry.root)  # young: spared by the runs so far
    await trio.to_thread.run_sync(age, registry.root, 7200)
    await eventually(
        lambda: trio.to_thread.run_sync(blob_files, registry.root), lambda files: layer not in files
    )
    events = await sink.wait_for(
        lambda evs: any(
            e["type"] == "zotregistry.blob.deleted" and "request" not in e["data"] for e in evs
        )
    )
    gc_events = [e for e in events if e["type"] == "zotregistry.blob.deleted"]
    assert all("actor" not in e["data"] and "request" not in e["data"] for e in gc_events)


async def gc_cli_text(config, *args):
    result = await trio.run_process(
        [sys.executable, "-m", "registry_trio", "gc", "-c", str(config), *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().splitlines()


async def test_gc_command_prints_what_it_would_delete_and_honours_gc_delay(nursery, tmp_path):
    registry = await start_registry(nursery, make_config(tmp_path))
    kept, dropped = make_image((700,)), make_image((900,))
    async with httpx.AsyncClient(base_url=registry.url) as http:
        client = RegistryClient(registry.url, client=http)
        await client.push_image("gc/app", "kept", kept)
        await client.push_image("gc/app", "dropped", dropped)
        assert (await http.delete("/v2/gc/app/manifests/dropped")).status_code == 202
    registry.shutdown.set()
    before = blob_files(registry.root)

    def config(**storage):
        # No extensions.events in the file: events off, the collector records nothing.
        path = tmp_path / "gc.json"
        path.write_text(json.dumps({"storage": {"rootDirectory": str(registry.root), **storage}}))
        return path

    # gcDelay defaults to 1h: garbage made a moment ago is too young to go, and the report
    # says what the delay kept: the untagged manifest, its body, config and layer.
    assert await gc_cli_text(config()) == [
        "deleted 0 manifest(s) and 0 blob(s), 0 bytes",
        "kept 1 manifest(s) and 3 blob(s) younger than storage.gcDelay (3600s)",
        "purged 0 idle upload session(s)",
    ]
    assert (await gc_cli(config()))["heldBack"] == {"manifests": 1, "blobs": 3}
    assert blob_files(registry.root) == before

    garbage = [dropped.config, *dropped.layers]
    blob_sizes = {dropped.digest: len(dropped.manifest)} | {b.digest: len(b.data) for b in garbage}
    total = sum(blob_sizes.values())
    dry = await gc_cli_text(config(gcDelay="0s"), "--dry-run")
    assert dry[0] == f"would delete 1 manifest(s) and 3 blob(s), {total} bytes"
    assert dry[1] == f"  manifest gc/app@{dropped.digest}"
    assert sorted(dry[2:-1]) == sorted(
        f"  blob {digest} ({size} bytes)" for digest, size in blob_sizes.items()
    )
    assert dry[-1] == "would purge 0 idle upload session(s)"
    assert blob_files(registry.root) == before  # a dry run deletes nothing
    no_delay = await gc_cli(config(gcDelay="0s"), "--dry-run")
    assert no_delay["heldBack"] == {"manifests": 0, "blobs": 0}

    done = await gc_cli_text(config(gcDelay="0s"))
    assert done == [
        line.replace("would delete", "deleted", 1).replace("would purge", "purged", 1)
        for line in dry
    ]
    assert blob_files(registry.root) == before - {d.split(":")[1] for d in blob_sizes}
    assert {b.digest.split(":")[1] for b in (kept.config, *kept.layers)} <= blob_files(
        registry.root
    )


async def test_periodic_gc_spares_garbage_younger_than_gc_delay(nursery, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="registry_trio.maintenance")
    config = make_config(
        tmp_path,
        storage={
            "rootDirectory": str(tmp_path / "registry_data"),
            "gc": True,
            "gcInterval": "50ms",
            "gcDelay": "1h",
        },
    )
    registry = await start_registry(nursery, config)
    image = make_image((600,))
    async with httpx.AsyncClient(base_url=registry.url) as http:
        await RegistryClient(registry.url, client=http).push_image("young/app", "v1", image)
        assert (await http.delete(f"/v2/young/app/manifests/{image.digest}")).status_code == 202
    files = blob_files(registry.root)
    layer = image.layers[0].digest.split(":")[1]
    assert layer in files

    async def runs_since_the_delete() -> int:
        return sum("gc: deleted" in r.getMessage() for r in caplog.records)

    seen = await runs_since_the_delete()
    await eventually(runs_since_the_delete, lambda n: n >= seen + 3)
    assert all(
        "gc: deleted 0 manifests and 0 blobs" in r.getMessage()
        for r in caplog.records
        if "gc: deleted" in r.getMessage()
    )
    assert blob_files(registry.root) == files


async def test_gc_command_refuses_a_storage_root_that_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-storage"
    config = tmp_path / "gc.json"
    config.write_text(json.dumps({"storage": {"rootDirectory": str(missing)}}))
    for extra in ((), ("--dry-run",), ("--json",)):
        result = await trio.run_process(
            [sys.executable, "-m", "registry_trio", "gc", "-c", str(config), *extra],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 1, extra
        (line,) = result.stderr.decode().splitlines()
        assert line.startswith("registry-trio: storage.rootDirectory: no storage at "), line
        assert str(missing) in line and result.stdout == b""
    assert not missing.exists()  # nothing was created in its place
