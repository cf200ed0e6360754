"""A spawn process pool that runs one task per video and logs progress as tasks finish."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

logger = logging.getLogger(__name__)


def video_pool(workers: int) -> ProcessPoolExecutor:
    # MediaPipe hangs in forked workers.
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def run_all(
    pool: ProcessPoolExecutor, tasks: Mapping[str, Future[dict[str, Any]]], what: str,
    describe: Callable[[dict[str, Any]], str] = lambda r: f"in {r['seconds']:.1f}s",
) -> dict[str, dict[str, Any]]:
    """Wait for every task, logging each finished one; the first exception cancels the rest and is raised.

    Tasks report bad inputs in their result; an exception here is a bug, and must stop the job.
    """
    results: dict[str, dict[str, Any]] = {}
    by_future = {future: name for name, future in tasks.items()}
    pending = set(by_future)
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            name = by_future[future]
            try:
                results[name] = future.result()
            except BaseException:
                for other in pending:
                    other.cancel()
                raise
            logger.info("%s %s %s (%d/%d)", what, name, describe(results[name]), len(results), len(tasks))
    return results
