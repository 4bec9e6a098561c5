"""Run the simulated worker's app under uvicorn (uvloop + httptools when available)."""

from __future__ import annotations

import importlib.util
import logging

import uvicorn

from sglctl.sim.app import build_app
from sglctl.sim.config import SimConfig

log = logging.getLogger(__name__)


def serve(config: SimConfig, ignored_args: list[str] | None = None) -> None:
    """Serve until SIGINT/SIGTERM. Blocks."""
    if ignored_args:
        log.warning("ignoring arguments the simulation has no use for: %s", " ".join(ignored_args))
    fast_loop = importlib.util.find_spec("uvloop") is not None
    fast_http = importlib.util.find_spec("httptools") is not None
    uv_config = uvicorn.Config(
        build_app(config),
        host=config.host,
        port=config.port,
        loop="uvloop" if fast_loop else "asyncio",
        http="httptools" if fast_http else "h11",
        log_config=None,  # sglctl.logs already configured the root logger
        log_level=config.log_level,
        access_log=config.log_level == "debug",
        lifespan="on",
        # A stalled worker holds requests forever; do not let that block shutdown for long.
        timeout_graceful_shutdown=1,
    )
    uvicorn.Server(uv_config).run()
