"""Register the pipeline as Prefect deployments and serve them, so runs can be launched from the UI.

Start a server first (`prefect server start`), point this process at it
(`export PREFECT_API_URL=http://127.0.0.1:4200/api`), then `python -m flows.serve`. The UI's
"Run" button on a deployment takes the flow's parameters (`params_file`, `stages`, `under`) and `overrides`:
the params schema with every key optional, so a run for a new subject (photos folder, class noun, method,
steps) needs no edit of params.yaml; the overrides are recorded with the run and checked before any stage starts.
"""
from __future__ import annotations

import argparse

from prefect import serve

from flows.pipeline import STAGES, pipeline


def deployments():
    """The full chain, plus one deployment per stage for re-running a single stage."""
    full = pipeline.to_deployment(name="full", tags=["proxytune"],
                                  description="Every stage, each served from cache when its inputs are unchanged.")
    single = [pipeline.to_deployment(name=f"stage-{stage}", parameters={"stages": [stage]}, tags=["proxytune"])
              for stage in STAGES]
    return [full, *single]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__).parse_args(argv)
    serve(*deployments())
    return 0


if __name__ == "__main__":
    main()
