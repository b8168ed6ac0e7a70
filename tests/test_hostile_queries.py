"""Faults a hostile probe found in the query surface, kept fixed (issue 10, items 1, 6, 11).

A real `convirt serve` over a real index (the fixtures of test_service.py, a server of this
module's own), and the micro-batcher with a real event loop and thread pool.
"""

# ruff: noqa: F811 (the server fixtures are imported from test_service: each use redefines one)
from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_service import (  # noqa: F401 (fixtures)
    bundle,
    error_of,
    ids_by_path,
    index_root,
    rows,
    search_text,
    server,
)

from service.model.batching import MicroBatcher

POISON = b'{"text": "\\ud800 x", "k": 3}'  # a lone surrogate: valid JSON, not valid Unicode


def post_raw(client: httpx.Client, body: bytes) -> httpx.Response:
    return client.post(
        "/v1/search/text", content=body, headers={"content-type": "application/json"}
    )


def test_one_poisoned_query_fails_alone_not_its_micro_batch(server):
    innocent = [json.dumps({"text": f"pleural effusion {i}", "k": 3}).encode() for i in range(60)]
    bodies = innocent[:30] + [POISON] * 5 + innocent[30:]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as session:
            headers = {"content-type": "application/json"}
            return await asyncio.gather(
                *(session.post("/v1/search/text", content=b, headers=headers) for b in bodies)
            )

    responses = asyncio.run(send_all())
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 60 and statuses.count(422) == 5, statuses
    poisoned = [r for r, body in zip(responses, bodies, strict=True) if body == POISON]
    for response in poisoned:
        message = response.json()["error"]["message"]
        assert "not valid Unicode" in message and "surrogate" in message


def test_the_batcher_answers_the_rest_of_a_batch_when_one_query_fails():
    calls: list[list[str]] = []

    def run_batch(items: list[str]) -> list[str]:
        calls.append(items)
        if "poison" in items:
            raise ValueError("the tokenizer choked")
        return [item.upper() for item in items]

    async def main() -> list:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(run_batch, pool, window_s=0.05, max_batch=32)
            batcher.start()
            batcher.last_batch_size = 2  # as when busy: wait for the window to fill the batch
            items = ["a", "b", "poison", "c"]
            results = await asyncio.gather(
                *(batcher.submit(i) for i in items), return_exceptions=True
            )
            await batcher.stop()
            return results

    results = asyncio.run(main())
    assert results[:2] == ["A", "B"] and results[3] == "C"
    assert isinstance(results[2], ValueError)
    assert calls[0] == ["a", "b", "poison", "c"]  # they were one batch, then run one by one
    assert sorted(map(tuple, calls[1:])) == [("a",), ("b",), ("c",), ("poison",)]


def test_filters_that_gave_500s_get_clear_422s(client):
    too_many = {f"field{i}": "x" for i in range(1000)}
    assert "at most 32" in error_of(search_text(client, "x", filters=too_many), 422)["message"]
    error = error_of(search_text(client, "x", filters={"width": 2**70}), 422)
    assert "64 bits" in error["message"]
    nan = post_raw(client, b'{"text": "x", "filters": {"width": NaN}}')
    assert "finite" in error_of(nan, 422)["message"]
    surrogate = post_raw(client, b'{"text": "x", "filters": {"modality": "\\udfff"}}')
    assert "not valid Unicode" in error_of(surrogate, 422)["message"]
    deep = "[" * 10_000 + "]" * 10_000
    response = client.post(
        "/v1/search/image",
        files={"file": ("a.png", b"\x89PNG\r\n\x1a\n", "image/png")},
        data={"filters": deep},
    )
    error_of(response, 422, "invalid_filters")
    error = error_of(search_text(client, "x", filters={"no_such_field": "x"}), 422)
    assert error["code"] == "invalid_filters"
    assert "known:" in error["message"] and "collection" in error["message"]


def test_absolute_paths_and_hashes_are_not_a_query_surface(client, rows, ids_by_path):
    for field in ("path", "source", "sha256"):
        error = error_of(search_text(client, "x", filters={field: "/etc/passwd"}), 422)
        assert error["code"] == "invalid_filters"
        known = error["message"].split("known:")[1]
        assert not {"path", "source", "sha256"} & {name.strip() for name in known.split(",")}
    # the archive-relative name still finds its image
    image = rows[0]["image"]
    body = search_text(client, rows[0]["text"], k=30, filters={"relpath": image}).json()
    assert [int(r["id"]) for r in body["results"]] == [ids_by_path[image]]


@pytest.mark.parametrize("text", ["\ud800", "ok \udc00 then"])
def test_lone_surrogates_in_the_schema(text):
    from service.api.queries import TextQuery

    with pytest.raises(ValueError, match="surrogate"):
        TextQuery(text=text)
