"""One module per pipeline stage."""
import proxytune  # noqa: F401  (project-local Prefect settings, before any module imports prefect)
