"""`GET /v1/generations/{id}/events`: a job's progress as server-sent events, until it ends.

Each event's `data` is the job as `GET /v1/generations/{id}` shows it. `event: status` is sent
first and on each change of status, `event: progress` when only the queue position or the step
changed; the stream ends after the event of a terminal status. A comment line every 15 s keeps
proxies from closing an idle stream. Store reads run in the thread pool (never on the event loop);
the job's end wakes the stream at once (`JobStore.watch`), and progress is read every 0.25 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from jobs.settings import Settings
from jobs.store import JobStore
from service import job_service
from service.auth import CallerDep, authenticate
from service.deps import SettingsDep, StoreDep
from service.errors import COMMON, errors
from service.generations import get_job

router = APIRouter(
    prefix="/v1/generations", tags=["generations"], dependencies=[Depends(authenticate)]
)

POLL_S = 0.25  # progress is written at most 4 times a second (`jobs.progress`)
KEEPALIVE_S = 15.0


def _event(name: str, number: int, data: str) -> bytes:
    return f"event: {name}\nid: {number}\ndata: {data}\n\n".encode()


async def _stream(store: JobStore, settings: Settings, job_id: str) -> AsyncIterator[bytes]:
    last: tuple[object, ...] | None = None
    number = 0
    quiet_since = time.monotonic()
    with store.watch(job_id) as watch:
        while True:
            watch.ended.clear()
            record = await run_in_threadpool(store.get, job_id)
            if record is None:  # expired while watched: nothing more will come
                return
            job = await run_in_threadpool(
                job_service.to_job, record, store, settings.public_url, settings.job_ttl_s
            )
            state = (job.status, job.queue_position, job.step)
            if state != last:
                name = "status" if last is None or last[0] != job.status else "progress"
                number += 1
                yield _event(name, number, job.model_dump_json())
                last, quiet_since = state, time.monotonic()
            elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                yield b": keep-alive\n\n"
                quiet_since = time.monotonic()
            if job.status.terminal:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.ended.wait(), POLL_S)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The job's events"},
        **errors(401, 404, 422, *COMMON),
    },
)
async def generation_events(
    job_id: str, caller: CallerDep, store: StoreDep, settings: SettingsDep
) -> StreamingResponse:
    """Server-sent events of the job: `status` on each change of status, `progress` on each
    change of queue position or step; ends once the job has ended."""
    await run_in_threadpool(get_job, store, job_id, caller)  # the caller's job, else 404
    return StreamingResponse(
        _stream(store, settings, job_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
