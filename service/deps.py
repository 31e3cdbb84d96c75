"""What routes depend on, as `Annotated` aliases: `store: StoreDep` and so on.

The objects are built once, by the app's lifespan (`service.app.create_app`), and kept in
`app.state`. The getters are `async` although they do not await: FastAPI runs a sync dependency in
its thread pool, a thread hop per dependency per request (about a millisecond for a generation
route's four).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from hypersd.registry import Registry
from jobs.queue import JobQueue
from jobs.service_time import ServiceTimes
from jobs.settings import Settings
from jobs.store import JobStore
from service.admission import Predictor


@dataclass
class Services:
    """The gateway's long-lived objects.

    Args:
        served: The models this deployment's workers can serve (embedded mode: one).
        auth: Whether requests need an API key (`service.auth`).
        service_times: The batch service times workers report, for SLA admission
            (`service.admission`); None: every model is cold (admitted).
        shared_device: Whether the served models' workers share one device (embedded mode:
            one process), so that a job waits for every model's work ahead.
    """

    settings: Settings
    registry: Registry
    store: JobStore
    queue: JobQueue
    served: list[str]
    auth: bool = True
    service_times: ServiceTimes | None = None
    shared_device: bool = False

    def __post_init__(self) -> None:
        if self.auth and not self.settings.api_keys:
            raise ValueError(
                "auth is on but HYPERSD_API_KEYS names no key: configure keys (their SHA-256), "
                "or turn auth off with HYPERSD_AUTH=false"
            )

    @property
    def default_model(self) -> str | None:
        """The model of a request naming none: the configured default, else the one model served
        here (a deployment serving one model has no other to give), else None: the registry's."""
        if self.settings.default_model is not None:
            return self.settings.default_model
        return self.served[0] if len(self.served) == 1 else None

    @property
    def predictor(self) -> Predictor:
        """Predicts jobs' finishes for SLA admission."""
        shared = None
        if self.shared_device:
            shared = {name: self.registry.get(name).default_steps for name in self.served}
        return Predictor(
            self.store,
            self.queue,
            self.service_times,
            self.settings.max_batch_size,
            shared,
            self.settings.deadline_headroom,
        )


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def get_services(request: Request) -> Services:
    return _services(request)


async def get_settings(request: Request) -> Settings:
    return _services(request).settings


async def get_registry(request: Request) -> Registry:
    return _services(request).registry


async def get_store(request: Request) -> JobStore:
    return _services(request).store


async def get_queue(request: Request) -> JobQueue:
    return _services(request).queue


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
StoreDep = Annotated[JobStore, Depends(get_store)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
