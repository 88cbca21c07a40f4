"""Admission before any work on a request or video job: room in the queue, and a per-client share of it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from ditserve.api import Overloaded


class ClientLimited(Overloaded):
    """This client already has its share of requests queued or running; the HTTP edge answers 429."""


class ClientLimiter:
    """Counts each client's requests in flight (queued or running) and refuses past `limit`, so one
    client cannot fill the whole queue. A client is its address (as forwarded by a trusted proxy):
    every caller of a server shares its one API key, so the key cannot tell them apart."""

    def __init__(self, limit: int):
        self.limit = limit
        self._in_flight: Counter[str] = Counter()

    @contextmanager
    def hold(self, client: str, retry_after: float) -> Iterator[None]:
        """One in-flight request of `client` for the duration of the block; ClientLimited past the limit."""
        self.take(client, retry_after)
        try:
            yield
        finally:
            self.release(client)

    def take(self, client: str, retry_after: float) -> None:
        """Count one more in-flight request (or video job) of `client`; ClientLimited past the limit.
        Each `take` is paired with one `release` when the work ends (a job: completed, failed or deleted)."""
        if self._in_flight[client] >= self.limit:
            raise ClientLimited(f"this client already has {self._in_flight[client]} requests queued or running "
                                f"(the limit per client is {self.limit}); retry when one finishes",
                                retry_after=retry_after)
        self._in_flight[client] += 1

    def release(self, client: str) -> None:
        self._in_flight[client] -= 1
        if self._in_flight[client] <= 0:
            del self._in_flight[client]

    def __len__(self) -> int:
        return len(self._in_flight)
