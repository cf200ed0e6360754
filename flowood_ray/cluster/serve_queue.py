"""One forward pass at a time on a replica: a request's crops go alone when nothing else is scoring or
waiting to, and into the next `@serve.batch` otherwise.

Serve's batch queue costs about a millisecond per request even with no wait (bench/serve.py), which
is all waste when the request would form a batch of one. Under load the queue is what makes requests
share forward passes, so it is kept for that.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")


class ForwardPasses(Generic[Job, Result]):
    """Routes jobs to `alone` (run on a worker thread) or to `batched`, which must take `turn()` around
    its own forward pass, so that no two passes of either kind overlap."""

    def __init__(self, alone: Callable[[Job], Result], batched: Callable[[Job], Awaitable[Result]]) -> None:
        self._alone = alone
        self._batched = batched
        self._turn = asyncio.Lock()
        self._waiting_or_running = 0

    def turn(self) -> asyncio.Lock:
        """Held by whichever forward pass runs now."""
        return self._turn

    async def run(self, job: Job) -> Result:
        # Count and test with no await between them: on the event loop this is atomic.
        self._waiting_or_running += 1
        try:
            if self._waiting_or_running == 1:
                async with self._turn:
                    return await asyncio.to_thread(self._alone, job)
            return await self._batched(job)
        finally:
            self._waiting_or_running -= 1
