"""The HTTP API (FastAPI) over a :class:`DaemonFacade`; routes in ``docs/contracts.md``."""
