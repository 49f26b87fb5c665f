"""Identical tensors give identical bytes: retraining with the same seed leaves every artifact's file unchanged, so
DVC (which compares file hashes) sees nothing new and re-runs nothing downstream."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import RecordingLogger, paths
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from proxytune.dreambooth import DreamBoothConfig, DreamBoothLoRA
from proxytune.io import canonical_safetensors
from proxytune.params import load_params
from tasks import distill, supervise


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def elsewhere(where: dict[str, Path], root: Path) -> dict[str, Path]:
    """The same stage writing its outputs into another folder."""
    return {**where, "out": root / "again", "loss_csv": root / "again.csv"}


def test_canonical_safetensors_sorts_metadata_and_keeps_tensors(tmp_path):
    tensors = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(5, dtype=torch.int64)}
    metadata = {f"key{i}": f"value {i}" for i in range(8)}  # kept in a Rust HashMap: a random order per save
    saved = []
    for i in range(4):
        path = tmp_path / f"{i}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        canonical_safetensors(path)
        saved.append(path.read_bytes())
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == metadata
        header = json.loads(saved[-1][8:8 + int.from_bytes(saved[-1][:8], "little")])
        assert list(header["__metadata__"]) == sorted(metadata)
        assert all(torch.equal(t, tensors[k]) for k, t in load_file(path).items())
    assert len(set(saved)) == 1


def test_lora_saves_are_byte_identical(synthesized, tmp_path):
    """diffusers writes two metadata keys (format, adapter config), in a random order per save unless sorted."""
    instance = sorted((paths(synthesized, "prepare")["out"] / "instance").glob("*.png"))
    recipe = DreamBoothLoRA(DreamBoothConfig(model="models/world/supervisor", instance_images=instance,
                                             instance_prompt="a photo of sks toy", class_prompt="a photo of toy",
                                             prior_preservation=False, num_class_images=0, sample_steps=2))
    recipe.setup()
    saves = {recipe.save(tmp_path / str(i)).read_bytes() for i in range(6)}
    assert len(saves) == 1


def test_retrained_supervisor_lora_is_byte_identical(synthesized):
    """`synthesized` holds the session's supervise outputs, trained in another folder; the same params again
    give the same bytes (the diffusers LoRA carries several metadata keys)."""
    params = load_params(synthesized / "params.yaml")
    where = elsewhere(paths(synthesized, "supervise"), synthesized)
    supervise.run(params, RecordingLogger(), where)
    assert tree_bytes(where["out"]) == tree_bytes(synthesized / "outputs/supervise")
    assert where["loss_csv"].read_bytes() == (synthesized / "outputs/supervise_loss.csv").read_bytes()


def test_retrained_student_is_byte_identical(synthesized):
    params = load_params(synthesized / "params.yaml")
    where = paths(synthesized, "distill")
    distill.run(params, RecordingLogger(), where)
    distill.run(params, RecordingLogger(), elsewhere(where, synthesized))
    assert tree_bytes(synthesized / "again") == tree_bytes(where["out"])
    assert (synthesized / "again.csv").read_bytes() == where["loss_csv"].read_bytes()
    config = json.loads((where["out"] / "adapter/adapter_config.json").read_text())
    assert config["target_modules"] == sorted(config["target_modules"])  # not the set's hash-seed order
