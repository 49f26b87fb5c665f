"""Student tuning recipes from the three papers, on any `ARStudent`, as reusable torchtune-style recipes.

- `ProxyTuning` (Wu et al. 2025): LoRA on the transformer, next-token loss on (prompt, image codes); the
  images are the supervisor's proxies, the references, both, or augmented references (the paper's baseline).
- `TwoStage` (Sun et al. 2025): stage 1 learns only the input embedding of a new identifier token [V] (and
  one token S_i per reference image); stage 2 additionally tunes Q/K/V in full, or LoRA on Q/K/V of every
  n-th layer. Textual-inversion prompt templates, "... S_i" appended to half of them.
- `ARBooth` (Chung et al. 2025): the identifier is P zero-initialised prefix vectors in the text
  condition's space; only cross-attention and MLP weights train; prior distillation pulls the student
  toward the frozen base model on its own class-prompt samples with KL(teacher || student).

Every recipe has `setup`, `train_step` (gradient accumulation, bf16 autocast, CFG dropout, per-token loss
weights), `trainable`/`optimizer`/`generator` for `proxytune.training`'s checkpoint and exact resume, and
`save`. `load_tuned` puts the saved artifacts back onto a freshly loaded base model.
"""
from __future__ import annotations

import contextlib
import copy
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ar_models import ARStudent, PromptBatch, load_student
from ar_models.base import insert_prefix
from proxytune import schema

ADAPTER_DIR = "adapter"
IDENTIFIERS_FILE = "identifiers.safetensors"
TUNED_WEIGHTS_FILE = "tuned_weights.safetensors"
CARD_FILE = "card.json"

# Textual inversion's object templates (Gal et al. 2022), which Sun et al. train with.
TI_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]


def _student(key: str, section: type = schema.Student):
    """The schema's default, so a notebook's TuneConfig() tunes as an unedited params.yaml would."""
    return field(default_factory=lambda: schema.default(section, key))


@dataclass
class TuneConfig:
    method: str = _student("method")
    steps: int = _student("steps")  # optimizer steps (for two_stage: stage 2's; stage 1 adds embedding_steps)
    batch_size: int = _student("batch_size")
    grad_accum: int = _student("grad_accum")
    learning_rate: float = _student("learning_rate")
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's; arbooth sets its own
    cond_dropout: float = _student("cond_dropout")
    mixed_precision: str = _student("mixed_precision")  # "bf16": autocast matmuls; trained weights stay fp32
    gradient_checkpointing: bool = _student("gradient_checkpointing")
    seed: int = 0
    lora_rank: int = _student("lora_rank")
    lora_alpha: int = _student("lora_alpha")
    lora_dropout: float = _student("lora_dropout")
    lora_groups: list[str] = _student("lora_groups")  # empty: the family's default LoRA targets
    lora_every_nth_layer: int = _student("lora_every_nth_layer")
    # two_stage
    embedding_steps: int = _student("embedding_steps", schema.TwoStage)
    embedding_lr: float = _student("embedding_lr", schema.TwoStage)
    stage2: str = _student("stage2", schema.TwoStage)  # "lora" on Q/K/V, "qkv": Q/K/V in full, "none": embedding only
    image_tokens: bool = _student("image_tokens", schema.TwoStage)  # one S_i token per reference image, mixed 1:1
    # arbooth
    prefix_tokens: int = _student("prefix_tokens", schema.ARBooth)
    prior_weight: float = _student("prior_weight", schema.ARBooth)
    tune_groups: list[str] = _student("tune_groups", schema.ARBooth)


@dataclass
class TuningData:
    """Pre-tokenised training data: image codes and each image's prompt (or, for two_stage, its index)."""

    codes: torch.Tensor  # (N, T)
    prompts: list[str]
    identifier: str
    class_noun: str
    token_weights: torch.Tensor | None = None  # (T,) per-token loss weights (scale-wise loss)
    prior_codes: torch.Tensor | None = None  # (M, T) the base model's class-prompt samples (arbooth)
    prior_prompt: str = ""


def strip_word(prompt: str, word: str) -> str:
    return " ".join(w for w in prompt.split() if w != word)


class Recipe(ABC):
    """Shared mechanics; subclasses choose what trains and how a batch's condition is built."""

    def __init__(self, student: ARStudent, cfg: TuneConfig):
        self.student, self.cfg = student, cfg
        self.trainable = nn.Module()  # everything trained hangs off this, so checkpoints find it by name
        self.trainable.student = student
        self.peft = None

    # -- setup helpers
    def _add_lora(self, modules: list[str]) -> None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=self.cfg.lora_rank, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                          target_modules=modules)
        self.peft = get_peft_model(self.student, lora)  # wraps in place: the student's Linears gain lora_A/B

    def _save_adapter(self, out_dir: Path) -> None:
        """peft's adapter folder; peft writes its set of target modules in hash order, so it is sorted first and
        identical weights give identical bytes."""
        config = self.peft.peft_config["default"]
        if isinstance(config.target_modules, set):
            config.target_modules = sorted(config.target_modules)
        self.peft.save_pretrained(str(out_dir / ADAPTER_DIR))

    def lora_modules(self, default_groups: list[str] | None = None) -> list[str]:
        groups = self.cfg.lora_groups or default_groups
        if groups:
            return self.student.module_names(groups, self.cfg.lora_every_nth_layer)
        return self.student.lora_target_modules()

    def _place(self, data: TuningData) -> TuningData:
        """Training tensors on the student's device (batches are indexed there; the sampling RNG stays on CPU)."""
        move = {k: getattr(data, k).to(self.student.device) for k in ("codes", "token_weights", "prior_codes")
                if getattr(data, k) is not None}
        return replace(data, **move)

    def _optimizer(self, groups: list[dict]) -> None:
        groups = [g for g in groups if g["params"]]
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, betas=tuple(self.cfg.betas), weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(self.cfg.seed)

    def _autocast(self):
        if self.cfg.mixed_precision == "bf16":
            return torch.autocast(self.student.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- training
    @abstractmethod
    def setup(self, data: TuningData) -> None:
        """Freeze the student, mark what trains, cache conditions, build the optimizer."""

    @abstractmethod
    def batch_loss(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses for the examples `idx` ('loss' is the one optimised)."""

    def train_step(self) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for _ in range(self.cfg.grad_accum):
            idx = torch.randint(len(self.data.codes), (self.cfg.batch_size,), generator=self.generator)
            with self._autocast():
                losses = self.batch_loss(idx)
            (losses["loss"] / self.cfg.grad_accum).backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v.item() / self.cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return totals

    # -- output
    @abstractmethod
    def save(self, out_dir: Path) -> list[str]:
        """Write what was learned; returns the file/folder names written."""


class ProxyTuning(Recipe):
    """LoRA on the student's transformer; condition features cached once per distinct prompt."""

    def setup(self, data: TuningData) -> None:
        torch.manual_seed(self.cfg.seed)
        self.data = self._place(data)
        self.student.requires_grad_(False)
        self._add_lora(self.lora_modules())
        if self.cfg.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.cond = encode_distinct(self.student, data.prompts)
        self._optimizer([{"params": [p for p in self.student.parameters() if p.requires_grad],
                          "lr": self.cfg.learning_rate}])
        self.student.train()

    def batch_loss(self, idx):
        loss = self.student.loss(self.cond[idx], self.data.codes[idx], self.cfg.cond_dropout, self.data.token_weights)
        return {"loss": loss}

    def save(self, out_dir: Path) -> list[str]:
        self._save_adapter(out_dir)
        return [ADAPTER_DIR]


class TwoStage(Recipe):
    """Sun et al.: identifier embedding first, then Q/K/V (full or LoRA). Prompts are rebuilt every step from
    the templates, so their features go through the text encoder with grad (the embedding is learned)."""

    def setup(self, data: TuningData) -> None:
        torch.manual_seed(self.cfg.seed)
        self.data = self._place(data)
        self.student.requires_grad_(False)
        n_images = len(data.codes)
        self.image_words = [f"<{data.identifier}-{i}>" for i in range(n_images)] if self.cfg.image_tokens else []
        self.words = [data.identifier, *self.image_words]
        self.token_ids = self.student.add_identifier_tokens(self.words, init_from=data.class_noun)
        table = self.student.text_embedding.weight
        table.requires_grad_(True)
        rows = torch.zeros(table.shape[0], 1, dtype=table.dtype)
        rows[self.token_ids] = 1.0
        table.register_hook(lambda g: g * rows.to(g))  # only the identifier rows learn; AdamW wd = 0 keeps the rest
        if self.cfg.stage2 == "lora":
            self._add_lora(self.lora_modules(["attn_qkv"]))
            self.stage2_params = [p for n, p in self.student.named_parameters() if "lora_" in n]
        elif self.cfg.stage2 == "qkv":
            qkv = set(self.student.parameter_groups()["attn_qkv"])
            self.stage2_params = [p for n, p in self.student.named_parameters() if n in qkv]
        elif self.cfg.stage2 == "none":  # the embedding-only baseline (textual inversion) Sun et al. compare with
            self.stage2_params = []
        else:
            raise ValueError(f"two_stage.stage2 must be 'lora', 'qkv' or 'none', got {self.cfg.stage2!r}")
        table.requires_grad_(True)  # peft freezes what it does not wrap
        for p in self.stage2_params:
            p.requires_grad_(False)  # until stage 2
        if self.cfg.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.embedding = table
        self._optimizer([{"params": [table], "lr": self.cfg.embedding_lr},
                         {"params": self.stage2_params, "lr": self.cfg.learning_rate}])
        self.student.train()

    def steps_done(self) -> int:
        """Optimizer steps taken so far: AdamW counts them for the embedding, which trains every step (and is
        restored from checkpoints with the optimizer, so a resumed run knows its stage)."""
        state = self.optimizer.state.get(self.embedding)
        return int(state["step"]) if state else 0

    def prompt_for(self, i: int) -> str:
        template = TI_TEMPLATES[int(torch.randint(len(TI_TEMPLATES), (1,), generator=self.generator))]
        prompt = template.format(f"{self.data.identifier} {self.data.class_noun}")
        use_image_token = self.image_words and bool(torch.rand(1, generator=self.generator) < 0.5)
        return f"{prompt} {self.image_words[i]}" if use_image_token else prompt

    def batch_loss(self, idx):
        in_stage2 = self.steps_done() >= self.cfg.embedding_steps
        for p in self.stage2_params:
            p.requires_grad_(in_stage2)
        cond = self.student.encode_prompts([self.prompt_for(int(i)) for i in idx])
        loss = self.student.loss(cond, self.data.codes[idx], self.cfg.cond_dropout, self.data.token_weights)
        return {"loss": loss, "stage": torch.tensor(2.0 if in_stage2 else 1.0)}

    def save(self, out_dir: Path) -> list[str]:
        rows = self.embedding.detach()[self.token_ids].contiguous()
        save_file({"text_embedding": rows}, str(out_dir / IDENTIFIERS_FILE),
                  metadata={"tokens": json.dumps(self.words)})
        if self.cfg.stage2 == "none":
            return [IDENTIFIERS_FILE]
        if self.cfg.stage2 == "lora":
            self._save_adapter(out_dir)
            return [IDENTIFIERS_FILE, ADAPTER_DIR]
        save_tuned_weights(self.student, set(self.student.parameter_groups()["attn_qkv"]), out_dir)
        return [IDENTIFIERS_FILE, TUNED_WEIGHTS_FILE]


class ARBooth(Recipe):
    """Prefix identifier + selective tuning + prior distillation toward the frozen base model."""

    def setup(self, data: TuningData) -> None:
        torch.manual_seed(self.cfg.seed)
        self.data = self._place(data)
        if data.prior_codes is None and self.cfg.prior_weight > 0:
            raise ValueError("arbooth with prior_weight > 0 needs the base model's class-prompt samples")
        self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval() if self.cfg.prior_weight > 0 else None
        self.student.requires_grad_(False)
        groups = self.student.parameter_groups()
        unknown = [g for g in self.cfg.tune_groups if g not in groups]
        if unknown:
            raise ValueError(f"arbooth.tune_groups: unknown groups {unknown} (known: {sorted(groups)})")
        self.tuned_names = {n for g in self.cfg.tune_groups for n in groups[g]}
        tuned = [p for n, p in self.student.named_parameters() if n in self.tuned_names]
        for p in tuned:
            p.requires_grad_(True)
        if self.cfg.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        clean = [strip_word(p, data.identifier) for p in data.prompts]
        self.cond = encode_distinct(self.student, clean)
        width = self.cond.features.shape[-1]
        self.trainable.prefix = nn.Parameter(torch.zeros(self.cfg.prefix_tokens, width, device=self.student.device))
        if self.teacher is not None:
            self.prior_cond = encode_distinct(self.student, [data.prior_prompt] * len(data.prior_codes))
        self._optimizer([{"params": [self.trainable.prefix, *tuned], "lr": self.cfg.learning_rate}])
        self.student.train()

    def distillation(self, idx: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) at temperature 1 on the teacher's own class-prompt samples, mean per token."""
        cond, codes = self.prior_cond[idx], self.data.prior_codes[idx]
        with torch.no_grad():
            teacher = F.log_softmax(self.teacher.logits(cond, codes).float(), -1)
        student = F.log_softmax(self.student.logits(cond, codes).float(), -1)
        return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()

    def batch_loss(self, idx):
        cond = insert_prefix(self.cond[idx], self.trainable.prefix)
        loss = self.student.loss(cond, self.data.codes[idx], self.cfg.cond_dropout, self.data.token_weights)
        out = {"subject_loss": loss}
        if self.teacher is not None:
            prior_idx = torch.randint(len(self.data.prior_codes), (len(idx),), generator=self.generator)
            out["prior_kl"] = self.distillation(prior_idx)
            loss = loss + self.cfg.prior_weight * out["prior_kl"]
        out["loss"] = loss
        return out

    def save(self, out_dir: Path) -> list[str]:
        save_file({"prefix": self.trainable.prefix.detach().contiguous()}, str(out_dir / IDENTIFIERS_FILE),
                  metadata={"identifier": self.data.identifier})
        save_tuned_weights(self.student, self.tuned_names, out_dir)
        return [IDENTIFIERS_FILE, TUNED_WEIGHTS_FILE]


RECIPES = {"proxy_tuning": ProxyTuning, "two_stage": TwoStage, "arbooth": ARBooth}


def build_recipe(student: ARStudent, cfg: TuneConfig) -> Recipe:
    if cfg.method not in RECIPES:
        raise ValueError(f"student.method must be one of {', '.join(RECIPES)}, got {cfg.method!r}")
    return RECIPES[cfg.method](student, cfg)


def encode_distinct(student: ARStudent, prompts: list[str]) -> PromptBatch:
    """Features for `prompts`, running the frozen text encoder once per distinct prompt."""
    distinct = sorted(set(prompts))
    with torch.no_grad():
        cond = student.encode_prompts(distinct)
    index = {p: i for i, p in enumerate(distinct)}
    return cond[torch.tensor([index[p] for p in prompts])]


def save_tuned_weights(student: ARStudent, names: set[str], out_dir: Path) -> None:
    state = {n: p.detach().contiguous() for n, p in student.named_parameters() if n in names}
    save_file(state, str(out_dir / TUNED_WEIGHTS_FILE))


def write_card(out_dir: Path, cfg: TuneConfig, student_params: dict, files: list[str], data: dict,
               final_loss: float | None) -> None:
    card = {"method": cfg.method, "family": student_params["family"], "files": files,
            "base": {k: v for k, v in student_params.items() if k in BASE_KEYS},
            "config": asdict(cfg), "params": student_params, "data": data, "final_loss": final_loss}
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True, default=str))


# the params that identify the base model (paths and sizes), recorded in the card
BASE_KEYS = ("family", "size", "vq_size", "checkpoint", "vq_checkpoint", "vq_config", "text_encoder", "tokenizer",
             "patch_nums", "image_size")


class TunedStudent:
    """A base student with the learned artifacts applied; `generate` inserts ARBooth's prefix for prompts that
    name the identifier (the identifier word itself is dropped, as in training)."""

    def __init__(self, student: ARStudent, identifier: str, prefix: torch.Tensor | None):
        self.student, self.identifier, self.prefix = student, identifier, prefix

    def condition(self, prompts: list[str]) -> PromptBatch:
        if self.prefix is None:
            return self.student.encode_prompts(prompts)
        rows = torch.tensor([self.identifier in p.split() for p in prompts])
        cond = self.student.encode_prompts([strip_word(p, self.identifier) for p in prompts])
        return insert_prefix(cond, self.prefix, rows.to(cond.mask.device))

    @torch.no_grad()
    def generate(self, prompts: list[str], batch_size: int = 8, seed: int = 0, **sampling) -> torch.Tensor:
        """Images for `prompts`, `batch_size` prompts per sampling call (chunk i uses seed + i), so a benchmark's
        hundred prompts never sit in one batch."""
        self.student.eval()
        chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
        return torch.cat([self.student.generate_from(self.condition(chunk), seed=seed + i, **sampling)
                          for i, chunk in enumerate(chunks)])


def load_tuned(out_dir: str | Path, student_params: dict | None = None) -> TunedStudent:
    """A fresh base model (from `student_params`, default: the card's) with the artifacts in `out_dir` applied."""
    out_dir = Path(out_dir)
    card = json.loads((out_dir / CARD_FILE).read_text())
    student = load_student(student_params or card["params"])
    identifier = card["data"]["identifier"]
    prefix = None
    if (out_dir / IDENTIFIERS_FILE).is_file():
        from safetensors import safe_open

        with safe_open(str(out_dir / IDENTIFIERS_FILE), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(out_dir / IDENTIFIERS_FILE))
        if "text_embedding" in tensors:
            ids = student.add_identifier_tokens(json.loads(meta["tokens"]))
            with torch.no_grad():
                student.text_embedding.weight[ids] = tensors["text_embedding"].to(student.text_embedding.weight)
        if "prefix" in tensors:
            prefix = tensors["prefix"].to(student.device)
    if (out_dir / TUNED_WEIGHTS_FILE).is_file():
        tuned = load_file(str(out_dir / TUNED_WEIGHTS_FILE))
        params = dict(student.named_parameters())
        missing = [n for n in tuned if n not in params]
        if missing:
            raise ValueError(f"{out_dir / TUNED_WEIGHTS_FILE}: tensors {missing[:3]} do not exist in the base model")
        with torch.no_grad():
            for name, value in tuned.items():
                params[name].copy_(value)
    if (out_dir / ADAPTER_DIR).is_dir():
        from peft import PeftModel

        PeftModel.from_pretrained(student, str(out_dir / ADAPTER_DIR))  # injects LoRA into `student` in place
    return TunedStudent(student.eval(), identifier, prefix)
