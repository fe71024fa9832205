"""One pooled keep-alive `httpx` client per SDK client, with bounded retries."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from ._core import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    Call,
    Timeout,
    answer,
    answer_retryable,
    backoff,
    connection_error,
    http_options,
    retry_after_of,
    transport_retryable,
)


class SyncTransport:
    """Sends `Call`s over one `httpx.Client`, retrying what `Call.retry` allows."""

    def __init__(
        self,
        url: str,
        *,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        limits: httpx.Limits | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        """A transport to `url`; it owns (and closes) its `httpx.Client` unless one is given."""
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        self.url = url
        self.max_retries = max_retries
        self._owned = http_client is None
        self._http = http_client or httpx.Client(**http_options(url, timeout, limits))

    def send(self, c: Call) -> httpx.Response:
        """The answer to `c` (any status), after the retries its kind allows."""
        attempt = 0
        target = self.url + c.path
        while True:
            try:
                response = self._http.request(c.method, target, content=c.body, headers=c.headers, params=c.params)
            except httpx.TransportError as exc:
                if attempt < self.max_retries and transport_retryable(exc, c.retry):
                    time.sleep(backoff(attempt))
                    attempt += 1
                    continue
                raise connection_error(exc, c, attempt + 1) from exc
            if (
                not response.is_success
                and attempt < self.max_retries
                and answer_retryable(response.status_code, response.content, c.retry)
            ):
                time.sleep(backoff(attempt, retry_after_of(response)))
                attempt += 1
                continue
            return response

    def json(self, c: Call) -> Any:
        """The JSON of the 2xx answer to `c`, or the matching `BulkheadError`."""
        return answer(self.send(c))

    def close(self) -> None:
        """Closes the pooled connections (if this transport made its `httpx.Client`)."""
        if self._owned:
            self._http.close()


class AsyncTransport:
    """Sends `Call`s over one `httpx.AsyncClient`, retrying what `Call.retry` allows."""

    def __init__(
        self,
        url: str,
        *,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        limits: httpx.Limits | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        """A transport to `url`; it owns (and closes) its `httpx.AsyncClient` unless one is given."""
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        self.url = url
        self.max_retries = max_retries
        self._owned = http_client is None
        self._http = http_client or httpx.AsyncClient(**http_options(url, timeout, limits))

    async def send(self, c: Call) -> httpx.Response:
        """The answer to `c` (any status), after the retries its kind allows."""
        attempt = 0
        target = self.url + c.path
        while True:
            try:
                response = await self._http.request(
                    c.method, target, content=c.body, headers=c.headers, params=c.params
                )
            except httpx.TransportError as exc:
                if attempt < self.max_retries and transport_retryable(exc, c.retry):
                    await asyncio.sleep(backoff(attempt))
                    attempt += 1
                    continue
                raise connection_error(exc, c, attempt + 1) from exc
            if (
                not response.is_success
                and attempt < self.max_retries
                and answer_retryable(response.status_code, response.content, c.retry)
            ):
                await asyncio.sleep(backoff(attempt, retry_after_of(response)))
                attempt += 1
                continue
            return response

    async def json(self, c: Call) -> Any:
        """The JSON of the 2xx answer to `c`, or the matching `BulkheadError`."""
        return answer(await self.send(c))

    async def aclose(self) -> None:
        """Closes the pooled connections (if this transport made its `httpx.AsyncClient`)."""
        if self._owned:
            await self._http.aclose()
