"""Prefect flows: wiring only."""
import proxytune  # noqa: F401  (project-local Prefect settings, before any module imports prefect)
