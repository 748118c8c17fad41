"""The radiologist worklist: a FastAPI app and page, served by uvicorn (level 3: no torch).

Typical use::

    app = create_app(config)             # build once: engine, auth, metrics registry
    api_main(config)                     # or serve it until SIGTERM (a supervised child)

See :mod:`triage_node.api.app` for the routes and :mod:`triage_node.api.health` for what
``/healthz`` and ``/metrics`` report.
"""

from __future__ import annotations

import logging

from triage_node import store
from triage_node.api.app import create_app
from triage_node.config import Config

__all__ = ["api_main", "create_app", "serve_app"]

log = logging.getLogger(__name__)


def serve_app(config: Config) -> None:
    """Serve :func:`create_app` on ``[api] host``/``port`` until SIGTERM or SIGINT.

    In the main thread uvicorn handles SIGTERM/SIGINT (finishing open requests first);
    the function then returns normally.

    Parameters
    ----------
    config : Config
        The effective configuration.

    Raises
    ------
    ConfigError
        If credentials are required but none is configured.
    """
    import signal
    import threading

    import uvicorn

    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.api.host, port=config.api.port, log_config=None, access_log=True,
        server_header=False, lifespan="on"))
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal that stopped it to the handler found before it
        # started: make that one "stop the server", so SIGTERM ends in a clean return
        # (also when it arrives before uvicorn installed its own handler).
        def stop(_sig: int, _frame: object) -> None:
            server.should_exit = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
    log.info("worklist API on http://%s:%d/ (auth %s)", config.api.host, config.api.port,
             "on" if (config.api.token or config.api.users) else "off")
    server.run()


def api_main(config: Config) -> None:
    """Run the worklist API until SIGTERM/SIGINT: the entry of a supervised child process.

    Sets up logging like the other children, then :func:`serve_app`.
    """
    from triage_node.logs import setup_logging

    setup_logging(config.logging.level, json_lines=config.logging.json)
    store.upgrade(config.database.url)  # idempotent; the API may start before the SCP
    serve_app(config)
