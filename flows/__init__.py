"""Thin Prefect flows over the medvae library: each task body is one call into `medvae`."""

import logging
import os

# Prefect's temporary server sends a telemetry heartbeat: medvae runs in hospitals with closed networks,
# must never phone home, and the heartbeat's writes race the flow's own on the server's SQLite file
# ("database is locked" tracebacks in the run's output). The server is a subprocess that inherits this
# environment, so setting it before the first flow runs is enough. An explicit user setting wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# A flow run without PREFECT_API_URL starts Prefect's temporary server, and Prefect waits 20 s for it. It
# took 17 s on an idle 2-core machine, 34-47 s with two CPU-bound processes beside it, and 88 s (plus
# 33 s of imports) under a load of 8 (docs/distributed.md has the measurements). A wait that fails half
# the runs of a busy machine is no wait at all: medvae allows 5 minutes. An explicit setting wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")

# Pillow's DEBUG records print decoded EXIF/TIFF tag values (Artist, ImageDescription ...): PHI in the flow
# logs, which Prefect ships to its server, whenever someone runs with DEBUG logging. Never below INFO.
logging.getLogger("PIL").setLevel(logging.INFO)


class _DropThreadTimeoutWarning(logging.Filter):
    # Prefect warns once per task run that a timeout cannot interrupt a sync task in a worker thread. Every
    # batch task of a Dask or thread-pool run says it (thousands of lines for an archive). The timeout
    # still ends the task when its blocking call returns; docs/distributed.md says where hard limits live.
    def filter(self, record: logging.LogRecord) -> bool:
        return "cannot interrupt blocking operations" not in record.getMessage()


logging.getLogger("prefect.task_runs").addFilter(_DropThreadTimeoutWarning())
