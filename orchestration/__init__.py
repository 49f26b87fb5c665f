"""Pipeline plumbing: stages as cached Prefect tasks keyed like DVC, MLflow tracking and models, presets, run
comparison and the multi-subject benchmark on Prefect work pools. Uses the ML library (`proxytune`) and
`ar_models`; never the stages (`tasks/`), the flows or the test bed."""
import logging
import os
from pathlib import Path

# Prefect keeps its records (ephemeral database, persisted task results) inside the project unless the
# user points it elsewhere; set before any module imports prefect.
os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
# No phoning home: this runs on machines without internet.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The temporary API server Prefect starts per process can be slow to come up on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# A heartbeat event every 30 s (Prefect's minimum; default 180) per flow run, so a killed process's run is marked
# Crashed within minutes by the server's crash watch (`orchestration.server`).
os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
# The library's own log lines (a stage resuming from its checkpoint, a cache entry healed) go to the console and to
# the Prefect run's logs; outside a run they stay on the console.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "proxytune")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
if logging.getLogger("proxytune").level == logging.NOTSET:
    logging.getLogger("proxytune").setLevel(logging.INFO)
