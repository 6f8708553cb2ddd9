"""The httpx clients of one upstream: made lazily in the running loop, spread over shards.

Rules of this module:

* Clients are made inside the event loop that uses them (a provider may be built before any
  loop exists) and replaced when the loop changes; a client of another loop cannot be
  awaited from this one, so it is dropped and its idle sockets left to the collector.
* A request leases the least busy of ``SHARDS`` clients, each keeping at most
  ``SHARD_KEEPALIVE`` idle connections. httpcore's pool looks at every connection it holds
  whenever a request starts or a response ends (a readability poll per idle socket), so one
  pool of 64 connections spent more CPU per streamed request than the request itself
  (bench W6). Small pools bound that work; a lone request always goes to the first shard
  and reuses its connections. A shard's client is made when first leased, and all share
  one TLS context (making one costs about as much as a whole client: the CA bundle).
* No limit on connections: the engine bounds concurrent generations, and a pool limit here
  would only make the excess wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import httpx

SHARDS = 8
SHARD_KEEPALIVE = 8
KEEPALIVE_EXPIRY = 4.0  # below the 5 s idle timeout of most servers (wirechat's included)


@dataclass(slots=True)
class _Shard:
    client: httpx.AsyncClient | None = None  # made on the first lease
    busy: int = 0  # requests holding a lease on this client


class UpstreamClients:
    def __init__(
        self,
        *,
        connect_timeout: float,
        headers: Mapping[str, str] | httpx.Headers | None = None,
        shards: int = SHARDS,
    ) -> None:
        if shards < 1:
            raise ValueError("shards must be at least 1")
        self._connect_timeout = connect_timeout
        self._headers = headers
        self._count = shards
        self._shards: list[_Shard] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tls: ssl.SSLContext | None = None

    @contextlib.contextmanager
    def lease(self) -> Iterator[httpx.AsyncClient]:
        """The least busy client, held until the block ends (keep it open as long as the
        response is read: that is when its connection is in use)."""
        shard = min(self._current(), key=_busy)
        client = shard.client
        if client is None or client.is_closed:
            client = shard.client = self._new_client()
        shard.busy += 1
        try:
            yield client
        finally:
            shard.busy -= 1

    async def aclose(self) -> None:
        """Close every connection (a later lease makes new clients)."""
        shards, self._shards = self._shards, []
        if self._loop is asyncio.get_running_loop():
            for shard in shards:
                if shard.client is not None:
                    await shard.client.aclose()

    def _current(self) -> list[_Shard]:
        loop = asyncio.get_running_loop()
        if not self._shards or self._loop is not loop:
            self._shards = [_Shard() for _ in range(self._count)]
            self._loop = loop
        return self._shards

    def _new_client(self) -> httpx.AsyncClient:
        if self._tls is None:
            self._tls = httpx.create_ssl_context()  # what each client would make alike
        return httpx.AsyncClient(
            headers=self._headers,
            verify=self._tls,
            timeout=httpx.Timeout(None, connect=self._connect_timeout),
            limits=httpx.Limits(
                max_connections=None,
                max_keepalive_connections=SHARD_KEEPALIVE,
                keepalive_expiry=KEEPALIVE_EXPIRY,
            ),
            follow_redirects=False,
        )


def _busy(shard: _Shard) -> int:
    return shard.busy
