"""The `proxytune` command: one entry point for what the README teaches, each subcommand a module's own CLI.

Subcommands import their module only when chosen, so `proxytune --help` answers without loading the stack.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "run": ("flows.pipeline", "run the pipeline, or single stages with --stage NAME"),
    "benchmark": ("flows.benchmark", "run many DreamBench subjects and aggregate one table"),
    "compare": ("orchestration.compare", "tabulate MLflow runs side by side (CSV, markdown, chart)"),
    "presets": ("orchestration.presets", "list presets, or apply them to params.yaml"),
    "params": ("proxytune.params", "every parameter's type, rule, default and meaning; --check FILE validates"),
    "summary": ("orchestration.summary", "print where the last run's outputs are and its headline metrics"),
    "serve": ("flows.serve", "register the Prefect deployments and serve them"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="proxytune", description="Subject-driven AR image generation, stage by stage.",
        epilog="\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
        + "\n\n`proxytune COMMAND --help` shows a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[ns.command][0])
    return module.main(ns.args) or 0


if __name__ == "__main__":
    sys.exit(main())
