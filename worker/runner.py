"""Runs jobs: the code behind the Celery task and behind embedded mode's in-process queue.

`JobRunner.run_job(job_id)` is what a task slot calls. It claims the job (queued -> running, so a
canceled job or a second delivery of the same message never runs), hands its images to the
micro-batcher, encodes them, and stores them with the job TTL in the same atomic write that marks
the job finished -- unless it was canceled meanwhile, in which case the result is discarded. While
Redis is down, the job's store writes wait for it to come back: the message stays unacked and the
result is kept, not lost.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from hypersd.contracts import ErrorDetail, JobStatus
from hypersd.registry import BACKENDS, ModelSpec
from jobs.png_text import png_text
from jobs.progress import StepReporter
from jobs.record import JobRecord
from jobs.service_time import ServiceTimes
from jobs.settings import Settings
from jobs.states import finish, start
from jobs.store import STORE_DOWN, JobStore, WorkerInfo
from worker import metrics
from worker.batcher import BatchKey, MicroBatcher

if TYPE_CHECKING:
    import PIL.Image

    from hypersd.pipeline import Generator, ImageRequest

log = logging.getLogger(__name__)

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# zlib level 1, not Pillow's 6: PNG is lossless at any level, and on the shipped 64x64 images
# level 6 took 0.39 ms against 0.11 ms, on every job's critical path, for files 20% smaller
# (3.2 KB against 3.9 KB): bytes are cheap here, latency is the product.
_PNG_COMPRESS_LEVEL = 1
_PHASES = ("text_encoding", "denoising", "vae_decode")
_STORE_RETRY_MAX_S = 1.0  # back-off cap while Redis is down: resume within a second of its return

T = TypeVar("T")


@dataclass(frozen=True)
class Generated:
    """One image of a batch, with the batch's phase timings."""

    image: PIL.Image.Image
    timings: dict[str, float]


def encode(
    image: PIL.Image.Image, output_format: str, text: Mapping[str, str] | None = None
) -> bytes:
    """`image` as `output_format` bytes; a PNG carries `text` as text chunks (`jobs.png_text`)."""
    from PIL.PngImagePlugin import PngInfo

    buffer = io.BytesIO()
    info = None
    if output_format == "png" and text:
        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)  # iTXt: UTF-8, so any prompt survives
    png = output_format == "png"
    options = {"pnginfo": info, "compress_level": _PNG_COMPRESS_LEVEL} if png else {}
    image.save(buffer, format=_PIL_FORMATS[output_format], **options)
    return buffer.getvalue()


class JobRunner:
    """A loaded model, its micro-batcher and the job store: everything a task slot needs.

    Args:
        generator: The loaded, warmed-up pipeline (used by the batcher thread only).
        store: Where jobs and images live.
        worker_id: This worker's id in heartbeats and in the jobs it runs.
        slots: Task slots feeding the batcher (reported as capacity).
        max_batch_size: Most images per pipeline call.
        max_wait_ms: How long a batch's first job waits for company.
        job_timeout_s: A job still waiting for its batch after this long fails.
        service_times: Where each batch's duration is reported (the gateway's SLA admission
            reads it); None: not reported.
    """

    def __init__(
        self,
        generator: Generator,
        store: JobStore,
        *,
        worker_id: str,
        slots: int,
        max_batch_size: int,
        max_wait_ms: float,
        job_timeout_s: float,
        service_times: ServiceTimes | None = None,
    ) -> None:
        self.generator = generator
        self.spec: ModelSpec = generator.spec
        self.store = store
        self.worker_id = worker_id
        self.slots = slots
        self.job_timeout_s = job_timeout_s
        self._busy = 0
        self._busy_lock = threading.Lock()
        self.service_times = service_times
        self._job_of: dict[int, str] = {}  # id() of a queued ImageRequest -> its job (progress)
        self.batcher: MicroBatcher[ImageRequest, Generated] = MicroBatcher(
            self._run_batch,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            on_batch=self._on_batch,
            in_flight=lambda: self._busy,
        )

    def _run_batch(self, key: BatchKey, requests: list[ImageRequest]) -> list[Generated]:
        job_ids = [self._job_of[id(r)] for r in requests if id(r) in self._job_of]
        result = self.generator.generate(
            requests,
            steps=key.steps,
            width=key.width,
            height=key.height,
            guidance_scale=key.guidance_scale,
            eta=key.eta,
            on_step=StepReporter(self.store, job_ids, key.steps),
        )
        return [Generated(image, result.timings) for image in result.images]

    def _on_batch(self, key: BatchKey, size: int, seconds: float) -> None:
        metrics.BATCH_SIZE.labels(key.model).observe(size)
        if self.service_times is not None:
            self.service_times.observe(key.model, key.steps, size, seconds)

    def info(self) -> WorkerInfo:
        """This worker's heartbeat."""
        return WorkerInfo(
            id=self.worker_id,
            model=self.spec.name,
            # The backend in use, which after a fallback is eager whatever the registry says.
            backend=self.generator.backend.backend,
            capacity=self.slots,
            busy=self._busy,
            last_beat=time.time(),
        )

    def _set_busy(self, delta: int) -> None:
        with self._busy_lock:
            self._busy += delta
            metrics.BUSY_SLOTS.labels(self.spec.name).set(self._busy)

    def _stored(self, job_id: str, write: Callable[[], T]) -> T:
        """`write` to the store, retried until Redis answers again if it is down.

        Waiting is right for a worker: a job's state cannot move on without the store, and a
        worker that never gets it back fails its liveness probe (no beat) and is replaced.
        """
        delay = 0.05
        while True:
            try:
                return write()
            except STORE_DOWN as error:
                log.warning("job %s: job store unavailable (%s), retrying", job_id, error)
                time.sleep(delay)
                delay = min(2 * delay, _STORE_RETRY_MAX_S)

    def run_job(self, job_id: str) -> None:
        """Run one job to its end; never raises (failures are stored on the job)."""
        # Busy from delivery on, not from the claim: a job on its way to the batcher is company
        # worth waiting for.
        self._set_busy(+1)
        try:
            self._run_job(job_id)
        finally:
            self._set_busy(-1)

    def _run_job(self, job_id: str) -> None:
        from hypersd.pipeline import ImageRequest

        claim = start(self.worker_id, uuid.uuid4().hex)  # one per delivery
        record = self._stored(job_id, lambda: self.store.update(job_id, claim))
        if record is None:
            log.info("job %s is not queued (canceled, done or expired): skipped", job_id)
            return
        if record.model != self.spec.name:
            error = ErrorDetail(type="wrong_worker", message=f"worker holds {self.spec.name!r}")
            self._fail(job_id, error)
            return
        assert record.started_at is not None
        metrics.QUEUE_WAIT.labels(record.model).observe(record.started_at - record.created_at)
        try:
            key = BatchKey(
                record.model,
                record.steps,
                record.width,
                record.height,
                record.guidance_scale,
                record.eta,
            )
            requests = [
                ImageRequest(record.prompt, seed, record.negative_prompt) for seed in record.seeds
            ]
            self._job_of.update({id(request): job_id for request in requests})
            try:
                outputs = self.batcher.submit(key, requests).result(timeout=self.job_timeout_s)
            finally:
                for request in requests:
                    self._job_of.pop(id(request), None)
            encode_start = time.perf_counter()
            images = [
                encode(output.image, record.output_format, png_text(record, seed))
                for output, seed in zip(outputs, record.seeds, strict=True)
            ]
            timings = {phase: outputs[0].timings[phase] for phase in _PHASES}
            timings["image_encoding"] = time.perf_counter() - encode_start
            timings["total"] = time.time() - record.started_at
            succeeded = finish(self.worker_id, JobStatus.SUCCEEDED, timings=timings)
            # `record` is the job as the claim wrote it: unless it was canceled meanwhile, the
            # images and the end go in one round trip
            done = self._stored(
                job_id,
                lambda: self.store.update(job_id, succeeded, images=images, known=record),
            )
            if done is not None:
                steps = str(record.steps)
                for phase, seconds in timings.items():
                    metrics.RUN_TIME.labels(record.model, steps, phase).observe(seconds)
                self._calibrate(record)
        except FutureTimeout:
            message = f"the job did not finish within {self.job_timeout_s:g} s"
            self._fail(job_id, ErrorDetail(type="timeout", message=message))
        except Exception as exc:  # a failed job is reported on the job, not lost in a log
            log.exception("job %s failed", job_id)
            self._fail(job_id, ErrorDetail(type="generation_failed", message=str(exc)))

    def _calibrate(self, record: JobRecord) -> None:
        """Report a job admitted with a predicted finish: how far off the prediction was."""
        if self.service_times is None or not record.predicted_s:
            return
        ratio = (time.time() - record.created_at) / record.predicted_s
        try:
            self.service_times.correct(record.model, ratio)
        except STORE_DOWN as error:  # the job is done: a lost report must not fail it
            log.warning("job %s: calibration not reported (%s)", record.id, error)

    def _fail(self, job_id: str, error: ErrorDetail) -> None:
        failed = finish(self.worker_id, JobStatus.FAILED, error=error)
        self._stored(job_id, lambda: self.store.update(job_id, failed))

    def close(self) -> None:
        """Finish the batches already submitted, then stop the batcher."""
        self.batcher.stop()


def load_runner(
    spec: ModelSpec,
    store: JobStore,
    *,
    worker_id: str,
    slots: int,
    max_batch_size: int,
    max_wait_ms: float,
    job_timeout_s: float,
    device: str | None = None,
    torch_threads: int | None = None,
    service_times: ServiceTimes | None = None,
) -> JobRunner:
    """Load and warm up `spec` in this process (never before a fork) and wrap it in a runner."""
    import torch

    from hypersd.pipeline import load

    if torch_threads:
        torch.set_num_threads(torch_threads)
    if spec.backend != "eager":
        # The series exists at 0 before a fallback can count it: `increase()` sees the step to 1.
        metrics.BACKEND_FALLBACKS.labels(spec.name, spec.backend)
    started = time.perf_counter()
    generator = load(spec, device=device, warmup=True)
    seconds = time.perf_counter() - started
    metrics.MODEL_LOAD.labels(spec.name).set(seconds)
    backend = generator.backend.backend
    for name in BACKENDS:  # one backend at 1 per model, the others 0 (after a reload too)
        metrics.BACKEND.labels(spec.name, name).set(int(name == backend))
    if backend != spec.backend:
        metrics.BACKEND_FALLBACKS.labels(spec.name, spec.backend).inc()
    artefact = generator.backend.artefact
    # The start-up cost: a first start builds the backend's artefact, later ones load it.
    source = "" if artefact is None else (", built" if generator.backend.built else ", cached")
    log.info(
        "model %s loaded and warmed up in %.1f s on backend %s%s (pid %d)",
        spec.name,
        seconds,
        backend,
        source,
        os.getpid(),
    )
    return JobRunner(
        generator,
        store,
        worker_id=worker_id,
        slots=slots,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        job_timeout_s=job_timeout_s,
        service_times=service_times,
    )


def load_runner_from_settings(
    spec: ModelSpec,
    store: JobStore,
    *,
    worker_id: str,
    settings: Settings,
    service_times: ServiceTimes | None = None,
) -> JobRunner:
    """`load_runner` sized by the deployment's settings: what a Celery worker and embedded mode
    both run."""
    return load_runner(
        spec,
        store,
        worker_id=worker_id,
        slots=settings.slots,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        job_timeout_s=settings.job_timeout_s,
        device=settings.device,
        torch_threads=settings.torch_threads,
        service_times=service_times,
    )
