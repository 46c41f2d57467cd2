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
