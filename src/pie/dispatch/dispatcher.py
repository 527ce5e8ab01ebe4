"""Placeholder: the dispatcher is built by the registry/jobs/dispatch issue."""

from __future__ import annotations


class Dispatcher:
    def __init__(self, settings, name: str = "dispatcher"):
        self.settings = settings
        self.name = name

    async def start(self) -> None:
        raise NotImplementedError("dispatcher not built yet")

    async def stop(self) -> None:
        return None
