"""The replica's forward-pass routing: alone when idle, batched under load, never two passes at once."""

import asyncio
import threading
import time

from flowood_ray.cluster.serve_queue import ForwardPasses


class Recorder:
    """Forward passes that take a little time and record how many ran at once, and which way each job went."""

    def __init__(self) -> None:
        self.running = 0
        self.most_at_once = 0
        self.route: dict[int, str] = {}
        self.batches: list[list[int]] = []
        self._lock = threading.Lock()
        self.passes: ForwardPasses[int, int] = ForwardPasses(self.alone, self.batched)
        self._queue: list[tuple[int, asyncio.Future[int]]] = []

    def _forward(self, jobs: list[int]) -> list[int]:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(0.02)
        with self._lock:
            self.running -= 1
        return [job * 10 for job in jobs]

    def alone(self, job: int) -> int:
        self.route[job] = "alone"
        return self._forward([job])[0]

    async def batched(self, job: int) -> int:
        # A small stand-in for @serve.batch's queue: whoever finds it empty drains it once the turn is free.
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((job, future))
        if len(self._queue) == 1:
            async with self.passes.turn():
                queued, self._queue = self._queue, []
                jobs = [j for j, _ in queued]
                self.batches.append(jobs)
                for j in jobs:
                    self.route[j] = "batched"
                for (_, f), result in zip(queued, await asyncio.to_thread(self._forward, jobs)):
                    f.set_result(result)
        return await future


def test_an_idle_replica_scores_alone_and_stays_idle_after() -> None:
    recorder = Recorder()

    async def one_after_another() -> list[int]:
        return [await recorder.passes.run(job) for job in range(3)]

    assert asyncio.run(one_after_another()) == [0, 10, 20]
    # A counter left raised by the first job would send every later one to the batch queue.
    assert recorder.route == {0: "alone", 1: "alone", 2: "alone"} and recorder.batches == []


def test_concurrent_jobs_share_batches_and_never_overlap() -> None:
    recorder = Recorder()

    async def burst() -> list[int]:
        return await asyncio.gather(*[recorder.passes.run(job) for job in range(6)])

    assert asyncio.run(burst()) == [job * 10 for job in range(6)]
    assert recorder.route[0] == "alone"
    assert all(recorder.route[job] == "batched" for job in range(1, 6))
    assert sorted(j for batch in recorder.batches for j in batch) == [1, 2, 3, 4, 5]
    assert recorder.most_at_once == 1


def test_a_failed_pass_does_not_leave_the_replica_busy() -> None:
    def broken(job: int) -> int:
        raise ValueError("unscorable")

    async def never_batched(job: int) -> int:
        raise AssertionError("an idle replica batched a job")

    passes: ForwardPasses[int, int] = ForwardPasses(broken, never_batched)

    async def twice() -> list[str]:
        errors = []
        for job in range(2):
            try:
                await passes.run(job)
            except ValueError as exc:
                errors.append(str(exc))
        return errors

    assert asyncio.run(twice()) == ["unscorable", "unscorable"]
    assert not passes.turn().locked()
