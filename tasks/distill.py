"""Stage `distill`: tune the AR student on the supervisor's proxies with LoRA (Proxy-Tuning).

Images are tokenised once and the codes cached by (tokenizer weights, image content), so re-running with
a different student learning rate or step count never re-encodes; prompt features come from the frozen
text encoder once per distinct prompt.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ar_models import ARStudent, PromptBatch, load_student
from proxytune.cache import cache_dir, checkpoint_dir
from proxytune.images import to_tensor
from proxytune.io import atomic_dir, atomic_file, atomic_write_text, read_jsonl, sha256_file
from proxytune.params import ProxytuneError, get
from proxytune.stage import stage_task
from proxytune.training import Checkpointer, train, write_loss_csv

ADAPTER_DIR = "adapter"


def tokenise_cached(student: ARStudent, files: list[Path], vq_checkpoint: str) -> torch.Tensor:
    """Codes (N, T) for `files`, reusing any image already encoded by the same tokenizer weights."""
    folder = cache_dir("codes") / sha256_file(vq_checkpoint)[:16]
    folder.mkdir(exist_ok=True)
    keys = [sha256_file(f) for f in files]
    missing = [i for i, k in enumerate(keys) if not (folder / f"{k}.safetensors").is_file()]
    for start in range(0, len(missing), 16):
        chunk = missing[start:start + 16]
        with torch.inference_mode():
            codes = student.encode_images(to_tensor([Image.open(files[i]) for i in chunk]))
        for i, c in zip(chunk, codes):
            with atomic_file(folder / f"{keys[i]}.safetensors") as tmp:
                save_file({"codes": c.contiguous()}, str(tmp))
    return torch.stack([load_file(str(folder / f"{k}.safetensors"))["codes"] for k in keys])


@dataclass
class StudentTuneConfig:
    lora_rank: int = 8
    lora_alpha: int = 8
    learning_rate: float = 1e-4
    steps: int = 500
    batch_size: int = 4
    cond_dropout: float = 0.1
    mixed_precision: str = "fp32"  # "bf16" autocasts matmuls; LoRA weights stay fp32
    seed: int = 0


class ProxyTuning:
    """LoRA on the student's transformer, trained with the next-token loss on (prompt, proxy codes)."""

    def __init__(self, student: ARStudent, cfg: StudentTuneConfig):
        self.student, self.cfg = student, cfg

    def setup(self, codes: torch.Tensor, prompts: list[str]) -> None:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(self.cfg.seed)
        self.student.requires_grad_(False)
        lora = LoraConfig(r=self.cfg.lora_rank, lora_alpha=self.cfg.lora_alpha,
                          target_modules=self.student.lora_target_modules())
        self.student.gpt = get_peft_model(self.student.gpt, lora)
        self.trainable = self.student.gpt
        distinct = sorted(set(prompts))
        with torch.inference_mode():
            cond = self.student.encode_prompts(distinct)
        index = {p: i for i, p in enumerate(distinct)}
        rows = torch.tensor([index[p] for p in prompts])
        self.features, self.mask = cond.features[rows].clone(), cond.mask[rows].clone()
        self.codes = codes
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.learning_rate, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.student.gpt.train()

    def _autocast(self):
        if self.cfg.mixed_precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        idx = torch.randint(len(self.codes), (self.cfg.batch_size,), generator=self.generator)
        with self._autocast():
            loss = self.student.loss(PromptBatch(self.features[idx], self.mask[idx]), self.codes[idx],
                                     cond_dropout=self.cfg.cond_dropout)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return {"loss": loss.item()}

    def save(self, out_dir: Path) -> Path:
        """The adapter in peft's format (`adapter_config.json` + `adapter_model.safetensors`)."""
        self.student.gpt.save_pretrained(str(out_dir / ADAPTER_DIR))
        return out_dir / ADAPTER_DIR


def run(params: dict, log) -> dict:
    """Tune the student on `outputs/synthesize`; write the peft adapter and a card describing it."""
    s = params["student"]
    if s.get("mixed_precision", "fp32") not in ("fp32", "bf16"):
        raise ProxytuneError(f"params: student.mixed_precision must be 'fp32' or 'bf16', got {s['mixed_precision']!r}")
    manifest = Path("outputs/synthesize/manifest.jsonl")
    rows = read_jsonl(manifest)
    student = load_student(s)
    codes = tokenise_cached(student, [manifest.parent / r["file"] for r in rows], s["vq_checkpoint"])
    cfg = StudentTuneConfig(
        lora_rank=int(s["lora_rank"]), lora_alpha=int(s["lora_alpha"]), learning_rate=float(s["learning_rate"]),
        steps=int(s["steps"]), batch_size=int(s["batch_size"]), cond_dropout=float(s["cond_dropout"]),
        mixed_precision=s.get("mixed_precision", "fp32"), seed=int(get(params, "seed")),
    )
    recipe = ProxyTuning(student, cfg)
    recipe.setup(codes, [r["prompt"] for r in rows])
    checkpoints = Checkpointer(checkpoint_dir("distill", params), int(s.get("checkpoint_every", 0)))
    history = train(recipe, cfg.steps, log, checkpoints)
    out = Path("outputs/distill")
    with atomic_dir(out) as tmp:
        recipe.save(tmp)
        card = {"method": "proxy-tuning", "family": s["family"], "base": {k: s[k] for k in
                ("size", "vq_size", "checkpoint", "vq_checkpoint", "text_encoder")},
                "params": s, "data": {"manifest_sha256": sha256_file(manifest), "num_images": len(rows)},
                "final_loss": history[-1]["loss"] if history else None}
        atomic_write_text(tmp / "card.json", json.dumps(card, indent=2))
    write_loss_csv("outputs/distill_loss.csv", history)
    checkpoints.clear()
    log.artifact(out / ADAPTER_DIR, "adapter")
    return {"adapter_dir": str(out / ADAPTER_DIR), "loss_csv": "outputs/distill_loss.csv"}


distill_task = stage_task("distill", run)
