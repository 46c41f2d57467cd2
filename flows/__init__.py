"""Thin Prefect flows over the medvae library: each task body is one call into `medvae`."""

import logging
import os

# Prefect's temporary server sends a telemetry heartbeat: medvae runs in hospitals with closed networks,
# must never phone home, and the heartbeat's writes race the flow's own on the server's SQLite file
# ("database is locked" tracebacks in the run's output). The server is a subprocess that inherits this
# environment, so setting it before the first flow runs is enough. An explicit user setting wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

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
