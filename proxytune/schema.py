"""The params schema: every parameter's type, range or choices, default and meaning, in one place.

`proxytune.params.load_params` validates params.yaml (and so presets and `dvc exp run -S` values, which end up
there) against `Params` before any stage runs, and returns the plain dict with the defaults filled in.
Validation is strict: text where a number goes is an error, not a guess; only a number PyYAML leaves as text
(`1e-3`: YAML 1.1 wants `1.0e-3`) is read as the number it is. `proxytune params` prints this schema.
"""
from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Optional

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen, MultipleOf
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import core_schema

SUBJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
WORDS = re.compile(r"^[^\s{}]+( [^\s{}]+)*$")
TOKEN = re.compile(r"^[^\s{}]+$")
NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@dataclass(frozen=True)
class Rule:
    """A check pydantic's constraints cannot say, with the words the error and `proxytune params` use."""

    text: str
    ok: Callable[[Any], bool]

    def __get_pydantic_core_schema__(self, source, handler):
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def check(self, value):
        if not self.ok(value):
            raise ValueError(self.text)
        return value


class Violation(ValueError):
    """A cross-field rule broken by `key` (dotted, below the model that checks it)."""

    def __init__(self, key: str, value, rule: str):
        super().__init__(rule)
        self.key, self.value = key, value


def _yaml_number(value):
    """PyYAML (YAML 1.1) reads `1e-3` as text; anything else stays as given, so 'thirty' fails as text."""
    return float(value) if isinstance(value, str) and NUMBER.match(value.strip()) else value


Real = Annotated[float, BeforeValidator(_yaml_number)]
Text = Annotated[str, Rule("must be non-empty text", lambda v: bool(v.strip()))]
Words = Annotated[str, Rule("must be words separated by single spaces, without braces", WORDS.match)]
Token = Annotated[str, Rule("must be one word: no spaces, no braces", TOKEN.match)]
Name = Annotated[str, Rule("must be 1-64 letters, digits, '_' or '-' (no paths)", SUBJECT_NAME.match)]
Template = Annotated[str, Rule("must be text with exactly one '{}' where the subject phrase goes, "
                               "e.g. 'a {} playing guitar'", lambda v: v.count("{}") == 1)]
EvalPrompts = Annotated[Any, Rule(
    "must be 'heldout' or a non-empty list of templates each containing {0} (identifier) and {1} (class noun)",
    lambda v: v == "heldout" or (isinstance(v, list) and len(v) > 0 and all(
        isinstance(t, str) and "{0}" in t and "{1}" in t for t in v)))]
Scheduler = Literal["dpm++", "euler", "ddim", "flow-euler"]
Probability = Annotated[Real, Field(ge=0, lt=1)]


class Section(BaseModel):
    """A params section: strict types (no guessing '30' is 30), unknown keys are typos, defaults checked too."""

    model_config = ConfigDict(strict=True, extra="forbid", validate_default=True)


class Bootstrap(Section):
    """The random-init tiny replicas `bootstrap` builds into models/tiny."""

    image_size: int = Field(64, ge=8, multiple_of=8, description="resolution of the replicas")


class Subject(Section):
    """The subject to personalise: its photos and the words its captions use ("a [V] <class>")."""

    name: Name = Field(description="names the run (MLflow, benchmark folders)")
    images: Text = Field(description="folder of the reference photos (3-5 is typical)")
    class_noun: Words = Field(description="the subject's class, as in 'a photo of sks dog'")
    caption: Template = Field("a {}", description="the reference photos' caption ('{}': '[V] <class>') and the "
                              "class prompt ('{}': '<class>'), in the text encoders' language: the world's 'a {}', "
                              "real models' 'a photo of {}' (DreamBooth's, set by the presets)")
    identifier: Token = Field(description="the [V] token that comes to mean the subject")


class Prepare(Section):
    """Reference photos become square RGB images at this resolution."""

    resolution: int = Field(32, ge=8, multiple_of=8, description="image size of the supervisor and the references")


class Supervisor(Section):
    """DreamBooth-LoRA on the diffusion supervisor (diffusers' train_dreambooth_lora* recipe)."""

    model: Text = Field("models/world/supervisor", description="diffusers folder or hub id: an SD1.5/SD2, SDXL, "
                        "SD3/SD3.5 or FLUX.1 pipeline")
    lora_rank: int = Field(4, ge=1, description="LoRA rank")
    lora_alpha: int = Field(4, ge=1, description="LoRA alpha (scale alpha/rank)")
    lora_dropout: Probability = Field(0.0, description="LoRA dropout")
    target_modules: Optional[list[Text]] = Field(None, min_length=1, description="module-name suffixes to wrap; "
                                                 "null: the family's attention projections")
    learning_rate: Real = Field(1.0e-3, gt=0, description="learning rate of the denoiser's LoRA")
    train_text_encoder: bool = Field(False, description="LoRA on the CLIP text encoder(s) too, at text_encoder_lr")
    text_encoder_lr: Real = Field(5.0e-5, gt=0, description="learning rate of the text-encoder LoRA")
    pivotal_tokens: int = Field(2, ge=0, description=">0: the identifier becomes this many trained embeddings "
                                "(pivotal tuning); the supervisor's prompts then say <sks>")
    token_lr: Real = Field(5.0e-3, gt=0, description="learning rate of those embeddings (textual inversion's)")
    steps: int = Field(80, ge=1, description="optimizer steps")
    batch_size: int = Field(2, ge=1, description="images per step (the global batch across processes)")
    prior_preservation: bool = Field(True, description="DreamBooth's class-prior loss on class images")
    prior_loss_weight: Real = Field(1.0, ge=0, description="weight of the prior loss")
    num_class_images: int = Field(8, ge=0, description="class images (cached; only missing ones are rendered)")
    class_batch_size: int = Field(4, ge=1, description="class images per pipeline call")
    sample_steps: int = Field(10, ge=1, description="sampler steps for class, validation and evaluation images")
    guidance_scale: Real = Field(5.0, ge=0, description="classifier-free guidance of those images")
    scheduler: Optional[Scheduler] = Field(None, description="sampler (flow-euler: SD3/FLUX only); "
                                           "null: the family's default")
    mixed_precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="frozen weights' precision "
                                                             "(LoRA weights stay fp32)")
    gradient_checkpointing: bool = Field(False, description="trade compute for memory")
    cache_latents: bool = Field(True, description="encode the images once (the VAE is frozen)")
    snr_gamma: Real = Field(0.0, ge=0, description="UNet models: min-SNR-gamma loss weighting (5.0 is usual); 0: off")
    weighting_scheme: Literal["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"] = Field(
        "none", description="SD3/FLUX timestep density and loss weight")
    logit_mean: Real = Field(0.0, description="logit_normal density of the SD3/FLUX timesteps: mean")
    logit_std: Real = Field(1.0, gt=0, description="logit_normal density: standard deviation")
    mode_scale: Real = Field(1.29, ge=0, description="`mode` density's scale")
    flux_guidance: Real = Field(1.0, ge=0, description="FLUX.1-dev guidance-embedding value during training")
    validation_prompt: Optional[Text] = Field(None, description="null: the first instance caption")
    validation_every: int = Field(0, ge=0, description="steps between validation images logged to MLflow (0: none)")
    num_validation_images: int = Field(2, ge=1, description="images per validation")
    checkpoint_every: int = Field(20, ge=0, description="steps between resumable checkpoints (0: none)")
    export_kohya: bool = Field(False, description="also write pytorch_lora_weights_kohya.safetensors (UNet models)")

    @model_validator(mode="after")
    def _class_images(self):
        if self.prior_preservation and self.num_class_images == 0:
            raise Violation("num_class_images", 0, "must be >= 1 while prior_preservation is true")
        return self


class Synthesize(Section):
    """The tuned supervisor renders the proxy images."""

    num_images: int = Field(16, ge=1, description="proxies to render (the paper renders about 1000)")
    batch_size: int = Field(4, ge=1, description="images per pipeline call (recorded per image)")
    sample_steps: int = Field(10, ge=1, description="sampler steps")
    guidance_scale: Real = Field(5.0, ge=0, description="classifier-free guidance")
    scheduler: Optional[Scheduler] = Field(None, description="sampler; null: the family's default")
    min_dino: Optional[Annotated[Real, Field(ge=-1, le=1)]] = Field(
        None, description="drop proxies whose mean DINO similarity to the references is lower (null: off)")
    user_prompts: list[Template] = Field([], description="extra templates, '{}' marks the subject")


class TwoStage(Section):
    """Sun et al. 2025: the identifier's embedding first, then LoRA or Q/K/V."""

    embedding_steps: int = Field(60, ge=0, description="stage 1 steps: identifier embedding only "
                                 "(paper: ~1500 at lr 1e-2)")
    embedding_lr: Real = Field(1.0e-2, gt=0, description="stage 1 learning rate")
    stage2: Literal["lora", "qkv", "none"] = Field("lora", description="lora (on Q/K/V) | qkv (Q/K/V in full) | "
                                                    "none (embedding only; student.steps ignored)")
    image_tokens: bool = Field(True, description="one S_i token per reference image, mixed 1:1")


class ScaleWeights(Section):
    """ARBooth's scale-wise loss (next-scale students: VAR, Infinity)."""

    early_scales: int = Field(8, ge=0, description="scales weighted `early`")
    early: Real = Field(1.0, ge=0, description="loss weight of the early scales")
    late: Real = Field(0.5, ge=0, description="loss weight of the later scales")


class ARBooth(Section):
    """Chung et al. 2025: prefix identifier vectors, cross-attention + MLP tuned, prior distillation."""

    prefix_tokens: int = Field(4, ge=1, description="zero-initialised identifier vectors in the text condition")
    tune_groups: list[Text] = Field(["cross_attn", "mlp"], min_length=1, description="parameter groups tuned")
    prior_weight: Real = Field(0.5, ge=0, description="λ of KL(teacher || student) on the base model's "
                               "class-prompt samples (0: off)")
    prior_images: int = Field(8, ge=0, description="class-prompt samples of the base model (cached)")
    prior_cfg_scale: Real = Field(1.0, ge=0, description="their classifier-free guidance")
    prior_top_k: int = Field(900, ge=0, description="their top-k (0: off)")
    prior_top_p: Real = Field(0.97, gt=0, le=1, description="their top-p")
    betas: list[Probability] = Field([0.9, 0.97], min_length=2, max_length=2, description="AdamW betas")
    scale_weights: ScaleWeights = Field(default_factory=ScaleWeights, description="the scale-wise loss")


class Student(Section):
    """The AR student and how it is tuned. Family-specific keys (vq_config, tokenizer, dtype,
    max_prompt_tokens, patch_nums) are passed to the family's loader, which checks them."""

    model_config = ConfigDict(extra="allow")

    family: Literal["llamagen", "lumina_mgpt", "janus_pro", "var", "infinity"] = Field(
        "llamagen", description="model family (presets/student_*_tiny.yaml)")
    size: Text = Field("world", description="the family's model size: tiny | world | B | L | XL | ...")
    vq_size: Optional[Text] = Field("world", description="the family's tokenizer size: tiny | world | VQ-16 | ...")
    checkpoint: Text = Field("models/world/llamagen/t2i.pt", description="model weights (file or folder)")
    vq_checkpoint: Optional[Text] = Field("models/world/llamagen/vq.pt", description="tokenizer weights")
    text_encoder: Optional[Text] = Field("models/world/llamagen/text_encoder", description="text encoder folder")
    image_size: int = Field(32, ge=8, multiple_of=8, description="the student's image size")
    device: Text = Field("auto", description="auto (CUDA when present) | cpu | cuda:N")
    method: Literal["proxy_tuning", "two_stage", "arbooth"] = Field(
        "two_stage", description="tuning recipe (presets/ hold each paper's setting)")
    data: Literal["proxies", "references", "proxies+references", "augmented_references"] = Field(
        "references", description="training images")
    augment_copies: int = Field(8, ge=1, description="per reference, for data: augmented_references")
    extra_subjects: list[Text] = Field([], description="other subjects' outputs/synthesize folders: one adapter, "
                                       "several identifiers")
    lora_rank: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: int = Field(8, ge=1, description="LoRA alpha")
    lora_dropout: Probability = Field(0.0, description="LoRA dropout")
    lora_groups: list[Text] = Field([], description="parameter groups to wrap (attn_qkv, attn_out, mlp, ...); "
                                    "[]: family default")
    lora_every_nth_layer: int = Field(1, ge=1, description="LoRA on layers 0, n, 2n, ...")
    learning_rate: Real = Field(1.0e-3, gt=0, description="learning rate")
    steps: int = Field(30, ge=1, description="optimizer steps (two_stage: stage 2's)")
    batch_size: int = Field(4, ge=1, description="images per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    cond_dropout: Annotated[Real, Field(ge=0, le=1)] = Field(0.1, description="CFG dropout of the condition")
    checkpoint_every: int = Field(20, ge=0, description="steps between resumable checkpoints (0: none)")
    mixed_precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: CPU/GPU autocast; "
                                                     "trained weights stay fp32")
    gradient_checkpointing: bool = Field(False, description="trade compute for memory")
    two_stage: TwoStage = Field(default_factory=TwoStage, description="method two_stage")
    arbooth: ARBooth = Field(default_factory=ARBooth, description="method arbooth")

    @model_validator(mode="after")
    def _prior_images(self):
        if self.method == "arbooth" and self.arbooth.prior_weight > 0 and self.arbooth.prior_images == 0:
            raise Violation("arbooth.prior_images", 0, "must be >= 1 while arbooth.prior_weight is above 0")
        return self


class Evaluate(Section):
    """Student and supervisor draw the evaluation prompts; DreamBench metrics score them."""

    prompts: EvalPrompts = Field("heldout", description="heldout (the project's held-out prompts) | list of DreamBench "
                         "templates ('{0}' identifier, '{1}' class noun)")
    prompts_per_model: int = Field(4, ge=0, description="first N prompts (0: all)")
    images_per_prompt: int = Field(1, ge=1, description="DreamBooth's protocol: 4")
    resize: int = Field(0, ge=0, description="0: each evaluator's own preprocessing; N: centre crop + resize first")
    embed_batch_size: int = Field(32, ge=1, description="images per DINO/CLIP forward pass")
    pres_images: int = Field(0, ge=0, description="class-prompt generations per model for ARBooth's PRES (0: skip)")
    lpips_backbone: str = Field("", description="local torchvision alexnet/vgg16 .pth for ARBooth's DIV (\"\": skip)")
    lpips_net: Literal["alex", "vgg"] = Field("alex", description="LPIPS network")
    clip_quick_gelu: bool = Field(False, description="true for OpenAI CLIP weights under a plain name")
    cfg_scale: Real = Field(4.0, ge=0, description="student sampling: classifier-free guidance")
    top_k: int = Field(0, ge=0, description="student sampling: top-k (0: off)")
    top_p: Real = Field(1.0, gt=0, le=1, description="student sampling: top-p")
    temperature: Real = Field(1.0, gt=0, description="student sampling: temperature")
    dino: Text = Field("models/world/evaluators/dino", description="DINO model folder")
    clip_model: Text = Field("proxytune-tiny-clip", description="open_clip model name")
    clip_pretrained: Text = Field("models/world/evaluators/clip/open_clip_model.safetensors",
                                  description="open_clip weights")
    clip_config_dir: Optional[str] = Field("models/world/evaluators/clip", description="folder of the model's "
                                           "open_clip config (null: open_clip's own)")


class Params(Section):
    """params.yaml."""

    seed: int = Field(0, ge=0, description="seeds every draw of every stage")
    bootstrap: Bootstrap = Field(default_factory=Bootstrap)
    subject: Subject
    prepare: Prepare = Field(default_factory=Prepare)
    supervisor: Supervisor = Field(default_factory=Supervisor)
    synthesize: Synthesize = Field(default_factory=Synthesize)
    student: Student = Field(default_factory=Student)
    evaluate: Evaluate = Field(default_factory=Evaluate)


def default(section: type[BaseModel], key: str):
    """A parameter's default (a fresh copy): the library's dataclasses take theirs from here."""
    return section.model_fields[key].get_default(call_default_factory=True)


# ---------------------------------------------------------------- one line per violation

def _rule(error: dict) -> str:
    kind = error["type"]
    ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in error.get("ctx", {}).items()}
    words = {
        "greater_than_equal": "must be >= {ge}", "greater_than": "must be > {gt}",
        "less_than_equal": "must be <= {le}", "less_than": "must be < {lt}",
        "multiple_of": "must be a multiple of {multiple_of}",
        "too_short": "must have at least {min_length} item(s)", "too_long": "must have at most {max_length} items",
        "literal_error": "must be {expected}", "int_type": "must be a whole number", "float_type": "must be a number",
        "bool_type": "must be true or false", "string_type": "must be text", "list_type": "must be a list",
        "model_type": "must be a mapping of parameters", "dict_type": "must be a mapping of parameters",
    }
    if kind == "value_error":
        return str(ctx["error"])
    return words[kind].format(**ctx) if kind in words else error["msg"][:1].lower() + error["msg"][1:]


def _dotted(loc) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def problems(error: ValidationError) -> list[str]:
    """Each violation as one line: `params: <dotted.key> = <value>: <rule>`."""
    lines = []
    for e in error.errors(include_url=False):
        key, value = _dotted(e["loc"]), e.get("input")
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, Violation):
            key, value = f"{key}.{cause.key}".lstrip("."), cause.value
        if e["type"] == "missing":
            lines.append(f"params: {key}: missing (required, no default)")
        elif e["type"] == "extra_forbidden":
            lines.append(f"params: {key}: unknown parameter (`proxytune params` lists them)")
        else:
            lines.append(f"params: {key} = {_short(value)}: {_rule(e)}")
    return lines


def validate(raw: dict) -> dict:
    """`raw` checked against `Params`, as a plain dict with every default filled in (raises ValidationError)."""
    return Params.model_validate(raw).model_dump()


# ---------------------------------------------------------------- the schema as documentation

def _flat(metadata):
    for m in metadata:
        yield from _flat(m.metadata) if isinstance(m, FieldInfo) else [m]


def type_rule(annotation, metadata=()) -> str:
    """A field's type and rules in words: `whole number, >= 1`, `fp32 | bf16 | fp16 or null`."""
    parts = []
    if typing.get_origin(annotation) is Annotated:
        annotation, metadata = typing.get_args(annotation)[0], [*annotation.__metadata__, *metadata]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return f"{type_rule(inner, metadata)} or null"
    if origin is Literal:
        parts.append(" | ".join(map(str, args)))
    elif origin is list:
        parts.append(f"list of ({type_rule(args[0])})")
    else:
        parts.append({int: "whole number", float: "number", bool: "true | false", str: "text", Any: "any"}
                     .get(annotation, getattr(annotation, "__name__", str(annotation))))
    for m in _flat(metadata):
        for cls, op, attr in ((Ge, ">=", "ge"), (Gt, ">", "gt"), (Le, "<=", "le"), (Lt, "<", "lt"),
                              (MultipleOf, "multiple of", "multiple_of")):
            if isinstance(m, cls):
                parts.append(f"{op} {getattr(m, attr)}")
        if isinstance(m, (MinLen, MaxLen)):
            parts.append(f"{'at least' if isinstance(m, MinLen) else 'at most'} "
                         f"{getattr(m, 'min_length', getattr(m, 'max_length', None))} items")
        if isinstance(m, Rule):  # says what the text must be
            parts[0] = m.text.removeprefix("must be ")
    return ", ".join(parts)


def describe(model: type[BaseModel] = Params, where: str = "") -> list[str]:
    """Every parameter: dotted key, type and rule, default, description; a section's docstring heads it."""
    lines = []
    for name, info in model.model_fields.items():
        key = f"{where}{name}"
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            lines += ["", f"{key}: {' '.join(info.annotation.__doc__.split())}"]
            lines += describe(info.annotation, f"{key}.")
            continue
        default = "required" if info.is_required() else f"default {info.get_default(call_default_factory=True)!r}"
        lines.append(f"  {key:<36} {type_rule(info.annotation, info.metadata)}; {default}. {info.description or ''}")
    return lines
