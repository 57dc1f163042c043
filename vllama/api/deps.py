"""What the routers share: the manager of the app a request came to."""

from __future__ import annotations

from fastapi import Request

from vllama.manager import Manager


def manager_of(request: Request) -> Manager:
    manager: Manager = request.app.state.manager
    return manager
