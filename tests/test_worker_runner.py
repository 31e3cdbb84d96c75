"""What a job's end carries: the real job runner on the shipped teacher, the in-memory job store
and service-time estimates of embedded mode (the Redis store's single round trip is
`test_serving_notices.py`'s)."""

from __future__ import annotations

import time
from pathlib import Path

from serving_fixtures import MODEL, SHIPPED_REGISTRY, one_slot_runner

from hypersd.contracts import GenerateRequest, JobStatus
from hypersd.registry import load_registry
from jobs.memory_store import MemoryJobStore
from jobs.record import resolve_request
from jobs.service_time import MemoryServiceTimes

PROMPT = "a large red circle in the center on a white background"


class SlowReports(MemoryServiceTimes):
    """Real in-memory estimates whose reports take a while, as a round trip to a busy Redis."""

    def __init__(self) -> None:
        super().__init__()
        self.reported_at: list[float] = []

    def observe(self, model: str, steps: int, batch_size: int, seconds: float) -> float:
        time.sleep(0.2)
        mean = super().observe(model, steps, batch_size, seconds)
        self.reported_at.append(time.time())
        return mean


def test_a_job_ends_with_its_images_and_after_its_batch_is_reported(tmp_path: Path) -> None:
    registry = load_registry(SHIPPED_REGISTRY)
    store = MemoryJobStore(tmp_path / "images", ttl_s=60)
    times = SlowReports()
    runner = one_slot_runner(registry.get(MODEL), store, service_times=times)
    try:
        body = GenerateRequest(prompt=PROMPT, model=MODEL, steps=1, n=2)
        job = store.create(resolve_request(body, registry))
        runner.run_job(job.id)
    finally:
        runner.close()
    done = store.get(job.id)
    assert done is not None and done.status == JobStatus.SUCCEEDED, done
    images = [store.get_image(job.id, index) for index in range(2)]
    assert all(image is not None and image.startswith(b"\x89PNG") for image in images)
    # whoever sees the job finished (the next request's admission) sees its batch's estimate
    assert times.estimates(MODEL, 1) and done.finished_at is not None
    assert done.finished_at >= times.reported_at[0]
