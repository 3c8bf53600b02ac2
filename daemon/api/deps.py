"""The API's dependencies: the facade, the settings in force, the completion slots and
the readiness check, as FastAPI ``Depends`` annotations the route modules share."""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from daemon.api.errors import ApiError
from daemon.api.facade import DaemonFacade
from daemon.config import ApiConfig

RETRY_AFTER_S = "1"


class CompletionSlots:
    """How many completion requests run now, at most ``limit`` (a request past it is
    refused, not queued: a queue of 32-prompt requests would hold the daemon for minutes).
    A streamed request holds its slot until its generation ends."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Take a slot if one is free."""
        with self._lock:
            if self.busy >= self.limit:
                return False
            self.busy += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.busy -= 1


_bearer = HTTPBearer(
    auto_error=False,
    description="Required on every route but /healthz when a token is set "
    "(reads: unless [api] public_reads; completions: unless completions_require_token "
    "is false).",
)


# Dependencies are async (they never touch a thread pool).


async def get_facade(request: Request) -> DaemonFacade:
    """The facade the app was created with."""
    facade: DaemonFacade = request.app.state.facade
    return facade


async def get_settings(request: Request) -> ApiConfig:
    """The API settings in force (the app's, as last reloaded)."""
    settings: ApiConfig = request.app.state.settings
    return settings


async def get_completion_slots(request: Request) -> CompletionSlots:
    """The app's completion slots."""
    slots: CompletionSlots = request.app.state.completion_slots
    return slots


async def require_ready(facade: Annotated[DaemonFacade, Depends(get_facade)]) -> None:
    """503 until the model is loaded and the worker runs."""
    if not facade.is_ready():
        raise ApiError(503, "the daemon is starting", headers={"Retry-After": RETRY_AFTER_S})


Facade = Annotated[DaemonFacade, Depends(get_facade)]
Settings = Annotated[ApiConfig, Depends(get_settings)]
Slots = Annotated[CompletionSlots, Depends(get_completion_slots)]
documented_auth = [Depends(_bearer)]
"""Route dependencies that only document the bearer scheme (the guard checks it)."""
