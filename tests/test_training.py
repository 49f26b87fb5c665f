"""Checkpoint and resume: a run killed halfway resumes from its newest checkpoint and ends bit-identical."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, RecordingLogger, paths
from safetensors.torch import load_file

from orchestration.cache import checkpoint_dir
from proxytune.params import load_params
from tasks import distill, supervise

STAGES = {
    "supervise": (supervise, "supervisor", "outputs/supervise/pytorch_lora_weights.safetensors"),
    "distill": (distill, "student", "outputs/distill/adapter/adapter_model.safetensors"),
}


class Killed(Exception):
    """Stands in for the process dying mid-run."""


class DiesAtStep(RecordingLogger):
    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def metrics(self, values, step=None):
        if step == self.step:
            raise Killed
        super().metrics(values, step)


@pytest.mark.parametrize("stage", STAGES)
def test_interrupted_run_resumes_exactly(synthesized, stage, caplog):
    module, section, weights = STAGES[stage]
    weights = synthesized / weights
    where = paths(synthesized, stage)
    params = load_params(synthesized / "params.yaml")
    params[section].update(steps=6, checkpoint_every=2)

    module.run(params, RecordingLogger(), where)
    uninterrupted = load_file(weights)
    shutil.rmtree(synthesized / f"outputs/{stage}")

    with pytest.raises(Killed):
        module.run(params, DiesAtStep(5), where)
    assert not (synthesized / f"outputs/{stage}").exists()  # nothing half-written
    assert [p.name for p in checkpoint_dir(stage, params, where).iterdir()] == ["step-0000004.pt"]

    resumed_log = RecordingLogger()
    with caplog.at_level(logging.INFO, logger="proxytune"):
        module.run(params, resumed_log, where)
    checkpoint = checkpoint_dir(stage, params, where) / "step-0000004.pt"
    assert f"resuming {stage} from step 4 (checkpoint {checkpoint})" in caplog.messages  # a user sees why
    assert [step for _, step in resumed_log.logged if step is not None] == [5, 6]
    resumed = load_file(weights)
    assert resumed.keys() == uninterrupted.keys()
    # the same steps with the same kernels and shapes, resumed from exact state: bit for bit
    assert all((resumed[k] == uninterrupted[k]).all() for k in resumed)
    assert not checkpoint_dir(stage, params, where).exists()  # cleared once the stage succeeded


def test_library_log_lines_reach_prefect(tmp_path):
    """The flows attach Prefect's API log handler to the library's logger (so "resuming ..." shows in a run's
    logs); that only works when the settings are in place before anything imports prefect."""
    code = ("import logging, flows.pipeline; from prefect.logging.handlers import APILogHandler; "
            "print(any(isinstance(h, APILogHandler) for h in logging.getLogger('proxytune').handlers))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "PREFECT_HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "True", out.stderr
