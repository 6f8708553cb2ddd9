"""providers/http_clients.py: the upstream clients are made lazily, spread over shards by
load, and closed; a lone request keeps reusing one client (and so its connections)."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from wirechat.providers.http_clients import UpstreamClients


def test_a_lone_request_always_gets_the_same_client() -> None:
    async def main() -> set[int]:
        clients = UpstreamClients(connect_timeout=1.0)
        seen = set()
        for _ in range(5):
            with clients.lease() as client:
                seen.add(id(client))
        await clients.aclose()
        return seen

    assert len(asyncio.run(main())) == 1


def test_requests_at_once_spread_over_the_shards_then_share_them() -> None:
    async def main() -> list[httpx.AsyncClient]:
        clients = UpstreamClients(connect_timeout=1.0, shards=3)
        with contextlib.ExitStack() as held:
            leased = [held.enter_context(clients.lease()) for _ in range(7)]
        await clients.aclose()
        return leased

    leased = asyncio.run(main())
    assert len({id(c) for c in leased[:3]}) == 3  # each of the first three on its own shard
    assert {id(c) for c in leased} == {id(c) for c in leased[:3]}  # then the least busy
    assert all(c.is_closed for c in leased)


def test_a_released_lease_frees_its_shard() -> None:
    async def main() -> tuple[httpx.AsyncClient, httpx.AsyncClient, httpx.AsyncClient]:
        clients = UpstreamClients(connect_timeout=1.0, shards=2)
        with clients.lease() as first:
            with clients.lease() as second:
                pass
            with clients.lease() as third:  # shard 2 is free again: not the busy first
                pass
        await clients.aclose()
        return first, second, third

    first, second, third = asyncio.run(main())
    assert second is third and first is not second


def test_after_aclose_or_in_another_loop_a_lease_makes_a_new_client() -> None:
    clients = UpstreamClients(connect_timeout=1.0)

    async def lease() -> httpx.AsyncClient:
        with clients.lease() as client:
            return client

    async def lease_close_lease() -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
        first = await lease()
        await clients.aclose()
        return first, await lease()

    first, second = asyncio.run(lease_close_lease())
    assert first.is_closed and second is not first
    third = asyncio.run(lease())  # a new loop: the old loop's client is not reused
    assert third is not second


def test_shards_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        UpstreamClients(connect_timeout=1.0, shards=0)
