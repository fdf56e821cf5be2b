from bench.registry_client import make_image


async def test_push_pull_roundtrip(client, http):
    image = make_image((4096, 1000))
    response = await client.push_image("library/alpine", "latest", image)
    assert response.status_code == 201
    assert response.headers["Docker-Content-Digest"] == image.digest
    assert await client.pull_image("library/alpine", "latest") == image.manifest
    tags = await http.get("/v2/library/alpine/tags/list")
    assert tags.json() == {"name": "library/alpine", "tags": ["latest"]}
