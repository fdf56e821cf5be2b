"""Documented claims that belong to no other test file: one test each, against a real server."""

from __future__ import annotations

import httpx

from tests.api_helpers import (
    OCI_MANIFEST,
    assert_oci_error,
    config_blob,
    image_manifest,
    push_blob,
    random_blob,
)
from tests.conftest import make_config, start_registry

MIB = 1024 * 1024


async def test_http_max_manifest_size_raises_the_limit(nursery, tmp_path):
    """``http.maxManifestSize``: the largest manifest accepted; 413 ``MANIFEST_INVALID`` past it."""
    limit = 5 * MIB
    registry = await start_registry(nursery, make_config(tmp_path, http={"maxManifestSize": limit}))
    async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
        config, layer = config_blob(), random_blob()
        await push_blob(http, "big", config)
        await push_blob(http, "big", layer)
        empty = image_manifest(config, [layer], annotations={"pad": ""})

        def padded(size: int) -> bytes:
            body = image_manifest(config, [layer], annotations={"pad": "x" * (size - len(empty))})
            assert len(body) == size
            return body

        for size, status in [(4 * MIB + 1, 201), (limit, 201), (limit + 1, 413)]:
            body = padded(size)
            response = await http.put(
                f"/v2/big/manifests/s{size}", content=body, headers={"Content-Type": OCI_MANIFEST}
            )
            if status == 201:
                assert response.status_code == 201, (size, response.text)
                assert (await http.get(f"/v2/big/manifests/s{size}")).content == body
            else:
                assert_oci_error(response, 413, "MANIFEST_INVALID")
                assert (await http.get(f"/v2/big/manifests/s{size}")).status_code == 404
