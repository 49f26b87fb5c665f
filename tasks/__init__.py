"""One module per pipeline stage."""
import orchestration  # noqa: F401  (project-local Prefect settings, before any module imports prefect)
