"""Checkpoint and resume: a run killed halfway resumes from its newest checkpoint and ends bit-identical."""
from __future__ import annotations

import shutil

import pytest
from conftest import RecordingLogger
from safetensors.torch import load_file

from proxytune.cache import checkpoint_dir
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
def test_interrupted_run_resumes_exactly(synthesized, stage):
    module, section, weights = STAGES[stage]
    params = load_params()
    params[section].update(steps=6, checkpoint_every=2)

    module.run(params, RecordingLogger())
    uninterrupted = load_file(weights)
    shutil.rmtree(f"outputs/{stage}")

    with pytest.raises(Killed):
        module.run(params, DiesAtStep(5))
    assert not (synthesized / f"outputs/{stage}").exists()  # nothing half-written
    assert [p.name for p in checkpoint_dir(stage, params).iterdir()] == ["step-0000004.pt"]

    resumed_log = RecordingLogger()
    module.run(params, resumed_log)
    assert [step for _, step in resumed_log.logged if step is not None] == [5, 6]
    resumed = load_file(weights)
    assert resumed.keys() == uninterrupted.keys()
    # the same steps with the same kernels and shapes, resumed from exact state: bit for bit
    assert all((resumed[k] == uninterrupted[k]).all() for k in resumed)
    assert not checkpoint_dir(stage, params).exists()  # cleared once the stage succeeded
