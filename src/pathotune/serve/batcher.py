"""Dynamic batching across tasks: images of any tasks wait in one bounded queue, a collector forms a batch of up
to ``max_batch`` images or until the first has waited ``max_wait``, and one inference thread runs each batch as
one mixed forward (:func:`pathotune.multitask.forward_mixed`: every image with its own task's prompts and head).

Admission is counted in images: an image is pending from the moment its request is admitted until its batch
starts, and a request that would take the pending count past ``max_queue`` is answered 429 with Retry-After.
Each image has its own future; a request whose futures were cancelled (it timed out) is left out of its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..errors import one_line
from ..multitask import forward_mixed
from .errors import RequestError
from .metrics import ServeMetrics
from .store import Loaded

DRAIN_CHECK_S = 0.05  # how often a batch still collecting looks whether the server is shutting down


@dataclass(frozen=True)
class Prediction:
    """One image's outcome: its task's logits and probabilities, and the batch it ran in."""

    logits: list[float]
    probs: list[float]
    batch: int
    batch_images: int
    batch_tasks: int


@dataclass(eq=False)
class Job:
    """One image waiting for a forward."""

    x: torch.Tensor
    loaded: Loaded
    future: asyncio.Future
    admitted: float = field(default_factory=time.monotonic)


class Batcher:
    """The queue, the collector task and the one inference thread."""

    def __init__(
        self,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        device: torch.device,
        metrics: ServeMetrics,
        threads: int | None = None,
    ) -> None:
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.device = device
        self.metrics = metrics
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.pending = 0
        self.running = 0  # images in the forward under way
        self.draining = False
        self.seconds_per_image = 0.0  # moving average, for Retry-After
        self.ids = itertools.count(1)
        # torch's thread count is per thread (OpenMP), so it is set in the inference thread itself
        setup = (torch.set_num_threads, (threads,)) if threads is not None else (None, ())
        self.executor = ThreadPoolExecutor(1, "pathotune-infer", initializer=setup[0], initargs=setup[1])
        self.collector: asyncio.Task | None = None
        self.idle = asyncio.Event()
        self.idle.set()

    def start(self) -> None:
        self.collector = asyncio.get_running_loop().create_task(self._collect(), name="pathotune-batcher")

    @property
    def ready(self) -> bool:
        return self.collector is not None and not self.collector.done() and not self.draining

    def retry_after(self) -> int:
        """Seconds after which the queue has likely room again (at least 1)."""
        return max(1, math.ceil((self.pending + self.running) * self.seconds_per_image))

    def check_room(self, n: int) -> None:
        """429 with Retry-After when ``n`` more images would overfill the queue; 503 while shutting down."""
        if self.draining:
            raise RequestError(503, "the server is shutting down; retry on another replica", {"Retry-After": "5"})
        if self.pending + n > self.max_queue:
            raise RequestError(
                429,
                f"the queue holds {self.pending} of {self.max_queue} images (--max-queue); retry later",
                {"Retry-After": str(self.retry_after())},
            )

    def submit(self, xs: Sequence[torch.Tensor], loaded: Loaded) -> list[asyncio.Future]:
        """Admit one request's images (all or none); their futures resolve to :class:`Prediction`."""
        self.check_room(len(xs))
        loop = asyncio.get_running_loop()
        jobs = [Job(x, loaded, loop.create_future()) for x in xs]
        self.pending += len(jobs)
        self.idle.clear()
        for job in jobs:
            self.queue.put_nowait(job)
        self.metrics.queue.set(self.pending)
        return [job.future for job in jobs]

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch = [first]
            deadline = loop.time() + max(0.0, self.max_wait_s - (time.monotonic() - first.admitted))
            while len(batch) < self.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                wait = deadline - loop.time()
                if wait <= 0 or self.draining:
                    break
                try:  # in slices, so that a shutdown stops the wait at once
                    batch.append(await asyncio.wait_for(self.queue.get(), min(wait, DRAIN_CHECK_S)))
                except asyncio.TimeoutError:
                    continue
            self.pending -= len(batch)
            self.metrics.queue.set(self.pending)
            live = [job for job in batch if not job.future.done()]  # a timed-out request's images are dropped
            if live:
                await self._run(live, loop)
            if self.pending == 0:
                self.idle.set()

    async def _run(self, jobs: list[Job], loop: asyncio.AbstractEventLoop) -> None:
        batch_id = next(self.ids)
        self.running = len(jobs)
        start = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self.executor, self._forward, jobs)
        except Exception as e:  # a failed forward fails its own requests, never the server
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(RequestError(500, f"the forward failed: {one_line(e, 200)}"))
            return
        finally:
            self.running = 0
        elapsed = time.perf_counter() - start
        rate = elapsed / len(jobs)
        self.seconds_per_image = rate if self.seconds_per_image == 0 else 0.8 * self.seconds_per_image + 0.2 * rate
        tasks = len({job.loaded.task.name for job in jobs})
        self.metrics.batch_images.observe(len(jobs))
        self.metrics.batch_tasks.observe(tasks)
        self.metrics.batch_seconds.observe(elapsed)
        self.metrics.images.inc(len(jobs))
        for job, (logits, probs) in zip(jobs, outputs, strict=True):
            if not job.future.done():
                job.future.set_result(Prediction(logits, probs, batch_id, len(jobs), tasks))

    def _forward(self, jobs: list[Job]) -> list[tuple[list[float], list[float]]]:
        """The mixed forward of one batch (in the inference thread): per image, logits and probabilities."""
        models, index, ids = [], {}, []
        for job in jobs:
            key = id(job.loaded.model)
            if key not in index:
                index[key] = len(models)
                models.append(job.loaded.model)
            ids.append(index[key])
        x = torch.stack([job.x for job in jobs]).to(self.device)
        with torch.inference_mode():
            logits = forward_mixed(models, x, torch.tensor(ids))
            return [(lg.float().cpu().tolist(), lg.float().softmax(-1).cpu().tolist()) for lg in logits]

    async def drain(self) -> None:
        """Stop waiting for fuller batches, finish every admitted image, then stop the collector and the thread."""
        self.draining = True
        await self.idle.wait()
        if self.collector is not None:
            self.collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.collector
        self.executor.shutdown(wait=True)
