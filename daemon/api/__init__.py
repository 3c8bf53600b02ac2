"""The HTTP API (FastAPI): routes from DESIGN.md over a :class:`DaemonFacade`."""
