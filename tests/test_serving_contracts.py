"""The wire models and the micro-batcher, without servers (torch-free and fast)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from hypersd.contracts import GenerateRequest, JobStatus, RequestError
from hypersd.registry import Registry, load_registry
from jobs.record import resolve_request
from jobs.states import MAX_ATTEMPTS, cancel, finish, public_status, requeue, start
from worker.batcher import BatchKey, MicroBatcher

PROMPT = "a large red circle in the center on a white background"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """The shipped base model plus a 1-step TCD entry (eta, no negative prompts)."""
    folder = tmp_path_factory.mktemp("registry")
    base = Path(__file__).resolve().parent.parent / "models" / "shapes-base"
    (folder / "registry.toml").write_text(
        f"""
default = "base"
[models.base]
family = "sd15"
path = "{base}"
recipe = "teacher"
steps = "1..50"
default_steps = 25
sizes = ["64x64"]
[models.one-step]
extends = "base"
recipe = "unified-1step-lora"
"""
    )
    return load_registry(folder / "registry.toml")


def test_defaults_come_from_the_registry(registry: Registry) -> None:
    record = resolve_request(GenerateRequest(prompt=PROMPT, n=3, seed=7), registry)
    assert (record.model, record.steps, record.width, record.height) == ("base", 25, 64, 64)
    assert record.guidance_scale == 5.0 and record.eta is None
    assert record.seeds == [7, 8, 9] and record.status == JobStatus.QUEUED
    one_step = resolve_request(GenerateRequest(prompt=PROMPT, model="one-step"), registry)
    assert (one_step.steps, one_step.guidance_scale, one_step.eta) == (1, 0.0, 1.0)


@pytest.mark.parametrize(
    ("body", "field", "allowed"),
    [
        ({"model": "nope"}, "model", ["base", "one-step"]),
        ({"model": "../etc"}, "model", ["base", "one-step"]),
        ({"steps": 51}, "steps", ["1-50"]),
        ({"width": 128}, "width", ["64x64"]),
        ({"height": 72}, "height", ["64x64"]),
        ({"guidance_scale": 20}, "guidance_scale", ["1 to 15"]),
        ({"eta": 0.5}, "eta", None),
        ({"model": "one-step", "steps": 9}, "steps", ["1-8"]),
        ({"model": "one-step", "negative_prompt": "blurry"}, "negative_prompt", None),
    ],
)
def test_values_the_model_refuses_name_the_field(
    registry: Registry, body: dict[str, object], field: str, allowed: list[str] | None
) -> None:
    with pytest.raises(RequestError) as caught:
        resolve_request(GenerateRequest.model_validate({"prompt": PROMPT, **body}), registry)
    assert caught.value.detail.field == field
    assert caught.value.detail.allowed == allowed


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": ""},
        {"prompt": "x" * 1001},
        {"prompt": PROMPT, "n": 9},
        {"prompt": PROMPT, "seed": -1},
        {"prompt": PROMPT, "output_format": "gif"},
        {"prompt": PROMPT, "colour": "red"},
    ],
)
def test_bounds_are_checked_before_the_registry(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate(body)


def test_fingerprint_depends_on_the_body_only() -> None:
    first = GenerateRequest(prompt=PROMPT, steps=2)
    assert first.fingerprint() == GenerateRequest(prompt=PROMPT, steps=2).fingerprint()
    assert first.fingerprint() != GenerateRequest(prompt=PROMPT, steps=3).fingerprint()


def test_only_a_queued_job_starts_and_a_canceled_one_keeps_its_status(registry: Registry) -> None:
    record = resolve_request(GenerateRequest(prompt=PROMPT), registry)
    running = start("w1", "delivery-1")(record)
    assert running is not None and running.status == JobStatus.RUNNING
    assert start("w2", "delivery-2")(running) is None  # a second delivery never runs it again
    assert start("w1", "delivery-3")(running) is None  # not even on the same worker
    # the same claim retried (its reply was lost): the job is this delivery's, as it stands
    assert start("w1", "delivery-1")(running) == running
    canceled = running.model_copy(update={"status": JobStatus.CANCELED})
    assert finish("w1", JobStatus.SUCCEEDED)(canceled) is None  # the result is discarded
    requeued = requeue("w1")(running)
    assert requeued is not None and requeued.status == JobStatus.QUEUED
    assert requeue("w2")(running) is None  # only the dead worker's jobs


def test_cancel_ends_only_live_jobs_and_a_thrice_lost_job_fails(registry: Registry) -> None:
    queued = resolve_request(GenerateRequest(prompt=PROMPT), registry)
    canceled = cancel(queued)
    assert canceled is not None and canceled.status == JobStatus.CANCELED
    assert canceled.finished_at is not None
    assert cancel(canceled) is None  # an ended job stays as it ended
    running = start("w1", "d")(queued)
    assert running is not None
    ran = cancel(running)
    assert ran is not None and ran.status == JobStatus.CANCELED
    # A job whose worker died MAX_ATTEMPTS times fails instead of killing another worker.
    doomed = running.model_copy(update={"attempts": MAX_ATTEMPTS})
    failed = requeue("w1")(doomed)
    assert failed is not None and failed.status == JobStatus.FAILED
    assert failed.error is not None and failed.error.type == "worker_lost"


def test_a_succeeded_job_reads_expired_once_its_images_are_past_the_ttl(
    registry: Registry,
) -> None:
    record = resolve_request(GenerateRequest(prompt=PROMPT), registry)
    running = start("w1", "d")(record)
    assert running is not None
    done = finish("w1", JobStatus.SUCCEEDED)(running)
    assert done is not None and done.finished_at is not None
    assert public_status(done, ttl_s=60) == JobStatus.SUCCEEDED
    old = done.model_copy(update={"finished_at": done.finished_at - 61})
    assert public_status(old, ttl_s=60) == JobStatus.EXPIRED
    failed = old.model_copy(update={"status": JobStatus.FAILED})
    assert public_status(failed, ttl_s=60) == JobStatus.FAILED  # only images expire


KEY = BatchKey("m", 1, 64, 64, 5.0, None)


def test_batcher_groups_compatible_jobs_and_splits_results() -> None:
    calls: list[tuple[BatchKey, list[int]]] = []
    release = threading.Event()

    def run(key: BatchKey, requests: list[int]) -> list[int]:
        release.wait(5)
        calls.append((key, requests))
        return [request * 10 for request in requests]

    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_batch_size=4, max_wait_ms=20)
    try:
        blocker = batcher.submit(KEY, [0])  # occupies the batcher while the rest queue up
        time.sleep(0.05)
        other = BatchKey("m", 2, 64, 64, 5.0, None)
        futures = [
            batcher.submit(KEY, [1, 2]),
            batcher.submit(other, [3]),
            batcher.submit(KEY, [4]),
            batcher.submit(KEY, [5, 6]),  # would make 5: next batch
        ]
        release.set()
        assert blocker.result(5) == [0]
        assert [future.result(5) for future in futures] == [[10, 20], [30], [40], [50, 60]]
    finally:
        batcher.stop()
    assert [(key.steps, requests) for key, requests in calls] == [
        (1, [0]),
        (1, [1, 2, 4]),
        (2, [3]),
        (1, [5, 6]),
    ]


def test_batcher_reports_a_failed_call_to_every_job_of_the_batch() -> None:
    def run(key: BatchKey, requests: list[int]) -> list[int]:
        raise RuntimeError("out of memory")

    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_batch_size=4, max_wait_ms=50)
    try:
        futures = [batcher.submit(KEY, [1]), batcher.submit(KEY, [2])]
        for future in futures:
            with pytest.raises(RuntimeError, match="out of memory"):
                future.result(5)
    finally:
        batcher.stop()


def test_the_gateway_imports_neither_torch_nor_diffusers() -> None:
    """The gateway image carries no torch: only embedded mode and workers load it, lazily."""
    code = (
        "import sys, service.app, worker.celery_app, launcher.cli; "
        "print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_a_lone_job_does_not_wait_for_company_but_one_with_company_in_flight_does() -> None:
    calls: list[list[int]] = []
    in_flight = 1

    def run(key: BatchKey, requests: list[int]) -> list[int]:
        calls.append(requests)
        return requests

    batcher: MicroBatcher[int, int] = MicroBatcher(
        run, max_batch_size=4, max_wait_ms=2000, in_flight=lambda: in_flight
    )
    try:
        started = time.monotonic()
        assert batcher.submit(KEY, [1]).result(5) == [1]
        assert time.monotonic() - started < 1, "a lone job waited for company"
        in_flight = 2  # another task slot holds a job that is on its way
        first = batcher.submit(KEY, [2])
        time.sleep(0.2)
        assert batcher.submit(KEY, [3]).result(5) == [3] and first.result(5) == [2]
    finally:
        batcher.stop()
    assert calls == [[1], [2, 3]]
