"""Prefect flows: wiring only."""
import orchestration  # noqa: F401  (project-local Prefect settings, before any module imports prefect)
