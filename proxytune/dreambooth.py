"""DreamBooth with LoRA for every supervisor family, as components a stage or a test drives step by step.

The recipe is the one diffusers' `examples/dreambooth/train_dreambooth_lora{,_sdxl,_sd3,_flux}.py` implement:
peft LoRA on the denoiser's attention (optionally on the CLIP text encoders, with their own learning rate),
the denoising loss on the instance images plus `prior_loss_weight` times the same loss on class images the
frozen base model rendered, so the class noun keeps its meaning. Per family the loss is the UNet's epsilon or
v-prediction target (optionally min-SNR-gamma weighted) or the flow-matching target `noise - latents` at
sigmas drawn by `compute_density_for_timestep_sampling` and weighted by `compute_loss_weighting_for_sd3`.
Fixes over those scripts: LoRA parameters stay fp32 under bf16/fp16 weights (no "Attempting to unscale FP16
gradients"), class images are cached across runs and only the missing ones rendered, every draw comes from
one generator the checkpoint carries, so a resumed run ends bit-identical.

Data parallel under `accelerate launch`: `batch_size` is the global batch. Every process draws the whole
batch's randomness from the shared generator and trains on its own equal slice; gradients are averaged
across processes, so N processes end with the LoRA one process would (to float rounding) and a checkpoint
resumes under any process count.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from proxytune import schema
from proxytune.diffusion import FLOW_FAMILIES, TEXTUAL_INVERSION_FILE, family_of, load_pipeline, sample
from proxytune.images import load_rgb, to_tensor
from proxytune.io import atomic_file, cache_dir, canonical_safetensors, read_or_heal, sha256_json, sha256_tree
from proxytune.params import ProxytuneError
from proxytune.progress import Progress
from proxytune.prompts import with_token

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
JOINT_ATTENTION = ATTENTION + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# The default target modules of diffusers' scripts for each family.
DENOISER_TARGETS = {
    "sd": ATTENTION,
    "sdxl": ATTENTION,
    "sd3": JOINT_ATTENTION,
    "flux": JOINT_ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
}
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# The CLIP encoders that take text-encoder LoRA and pivotal tokens (T5 is never tuned, as in diffusers).
CLIP_ENCODERS = {"sd": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"],
                 "sd3": ["text_encoder", "text_encoder_2"], "flux": ["text_encoder"]}
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
EMBEDDING_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _supervisor(key: str):
    """The schema's default, so a notebook's config trains as an unedited params.yaml would."""
    return field(default_factory=lambda: schema.default(schema.Supervisor, key))


@dataclass
class DreamBoothConfig:
    model: str
    instance_images: list[Path]
    instance_prompt: str | list[str]  # one caption for all images, or one per image
    class_prompt: str
    lora_rank: int = _supervisor("lora_rank")
    lora_alpha: int = _supervisor("lora_alpha")
    lora_dropout: float = _supervisor("lora_dropout")
    target_modules: list[str] | None = _supervisor("target_modules")  # None: the family's default (DENOISER_TARGETS)
    learning_rate: float = _supervisor("learning_rate")
    train_text_encoder: bool = _supervisor("train_text_encoder")
    text_encoder_lr: float = _supervisor("text_encoder_lr")
    token_lr: float = _supervisor("token_lr")
    steps: int = _supervisor("steps")
    batch_size: int = _supervisor("batch_size")
    prior_preservation: bool = _supervisor("prior_preservation")
    prior_loss_weight: float = _supervisor("prior_loss_weight")
    num_class_images: int = _supervisor("num_class_images")
    class_batch_size: int = _supervisor("class_batch_size")
    sample_steps: int = _supervisor("sample_steps")
    guidance_scale: float = _supervisor("guidance_scale")
    scheduler: str | None = _supervisor("scheduler")  # sampler for class/validation images; None: the family's default
    mixed_precision: str = _supervisor("mixed_precision")  # fp32 | bf16 | fp16
    gradient_checkpointing: bool = _supervisor("gradient_checkpointing")
    cache_latents: bool = _supervisor("cache_latents")
    snr_gamma: float = _supervisor("snr_gamma")  # UNet families; 0: plain MSE
    weighting_scheme: str = _supervisor("weighting_scheme")  # flow families (proxytune.schema lists them)
    logit_mean: float = _supervisor("logit_mean")
    logit_std: float = _supervisor("logit_std")
    mode_scale: float = _supervisor("mode_scale")
    flux_guidance: float = _supervisor("flux_guidance")  # the guidance embedding's value while training FLUX.1-dev
    pivotal_tokens: int = _supervisor("pivotal_tokens")  # >0: new trained token embeddings
    identifier: str = "sks"
    validation_prompt: str | None = _supervisor("validation_prompt")
    num_validation_images: int = _supervisor("num_validation_images")
    seed: int = 0
    prompts: list[str] = field(init=False, default_factory=list)

    def __post_init__(self):
        captions = self.instance_prompt
        self.prompts = [captions] * len(self.instance_images) if isinstance(captions, str) else list(captions)
        if len(self.prompts) != len(self.instance_images):
            raise ProxytuneError(f"{len(self.prompts)} captions for {len(self.instance_images)} instance images")


def model_fingerprint(model: str) -> str:
    """What identifies a base model: the contents of a local folder, else the hub id."""
    return sha256_tree(model) if Path(model).exists() else f"hub:{model}"


def pivotal_token_names(identifier: str, count: int) -> list[str]:
    """`<sks>`, `<sks>_1`, ...: the names `load_textual_inversion` gives a multi-vector embedding, so a
    prompt written with `<sks>` expands to all of them after loading."""
    first = f"<{identifier}>"
    return [first] + [f"{first}_{i}" for i in range(1, count)]


class DreamBoothLoRA:
    """setup() -> train_step() x N -> save(); no orchestration inside, so tests drive it directly.

    `proxytune.training.train` runs the steps and checkpoints `trainable`, `optimizer` and `generator`.
    `process` is accelerate's `PartialState` when several processes train together (None: this one alone).
    """

    def __init__(self, cfg: DreamBoothConfig, process=None):
        self.cfg, self.process = cfg, process

    # ---- setup -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
        from diffusers.training_utils import cast_training_params

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        process = self.process
        self.world = process.num_processes if process else 1
        if cfg.batch_size % self.world:
            raise ProxytuneError(f"params: supervisor.batch_size {cfg.batch_size} (the global batch) must be a "
                                 f"multiple of the {self.world} training processes")
        share, rank = cfg.batch_size // self.world, process.process_index if process else 0
        self.shard = slice(rank * share, (rank + 1) * share)  # this process's rows of every batch
        self.device = process.device if process else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = DTYPES[cfg.mixed_precision]
        self.pipe = load_pipeline(cfg.model, scheduler=cfg.scheduler).to(self.device)
        self.family = family_of({"_class_name": type(self.pipe).__name__}, cfg.model)
        self.flow = self.family in FLOW_FAMILIES
        self.denoiser = self.pipe.transformer if self.flow else self.pipe.unet
        for module in self.pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        schedulers = FlowMatchEulerDiscreteScheduler if self.flow else DDPMScheduler
        self.noise_scheduler = schedulers.from_config(self.pipe.scheduler.config)
        self.resolution = Image.open(cfg.instance_images[0]).width
        self.class_images_rendered = 0
        with process.main_process_first() if process else nullcontext():  # one process renders, the rest read
            self.class_images = self._class_images() if cfg.prior_preservation else []

        self.text_encoders = {n: getattr(self.pipe, n) for n in CLIP_ENCODERS[self.family]}
        self.instance_prompts = list(cfg.prompts)
        if cfg.pivotal_tokens:
            self._add_pivotal_tokens()
        self.train_text = cfg.train_text_encoder or cfg.pivotal_tokens > 0
        self._add_adapters()
        # add_adapter freezes all but the adapters, so pivotal tuning's embedding tables are unfrozen after it
        for te in self.text_encoders.values() if cfg.pivotal_tokens else []:
            te.get_input_embeddings().weight.requires_grad_(True)
        if self.dtype != torch.float32:  # frozen weights in half precision, trained ones in fp32
            for module in [self.denoiser, *self.text_encoders.values()]:
                module.to(self.dtype)
            cast_training_params([self.denoiser, *self.text_encoders.values()], dtype=torch.float32)
        if cfg.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
            if self.train_text:
                for te in self.text_encoders.values():
                    te.gradient_checkpointing_enable()

        with torch.no_grad(), self.autocast():
            self.instance_pixels = to_tensor([Image.open(p) for p in cfg.instance_images]).to(self.device)
            self.class_pixels = to_tensor(self.class_images).to(self.device) if self.class_images else None
            self.instance_latents = self._latent_dist(self.instance_pixels) if cfg.cache_latents else None
            self.class_latents = (self._latent_dist(self.class_pixels)
                                  if cfg.cache_latents and self.class_images else None)
            self.embeds = {} if self.train_text else {
                p: self._encode([p]) for p in dict.fromkeys(self.instance_prompts + [cfg.class_prompt])}
        if self.family == "sdxl":  # size/crop micro-conditioning: square images, resized, no crop
            r = self.resolution
            self.time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=self.device)

        self.trainable = torch.nn.ModuleDict({"denoiser": self.denoiser, **self.text_encoders})
        denoiser_params = [p for p in self.denoiser.parameters() if p.requires_grad]
        text_params = [p for te in self.text_encoders.values() for p in te.parameters() if p.requires_grad]
        self.params = denoiser_params + text_params
        if self.world > 1:  # every process starts from the main process's weights (device RNGs may differ)
            for p in self.params:
                torch.distributed.broadcast(p.data, src=0)
        # pivotal tuning's embedding tables learn at textual inversion's rate, the text encoders' LoRA at its own
        tables = {id(te.get_input_embeddings().weight) for te in self.text_encoders.values()}
        groups = [{"params": denoiser_params, "lr": cfg.learning_rate},
                  {"params": [p for p in text_params if id(p) not in tables], "lr": cfg.text_encoder_lr},
                  {"params": [p for p in text_params if id(p) in tables], "lr": cfg.token_lr}]
        groups = [g for g in groups if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=1e-2)
        # fp16 gradients of the fp32 LoRA parameters are scaled; bf16 needs no scaler.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self._train_mode(True)

    def _class_images(self) -> list[Image.Image]:
        """The base model's renders of the class prompt, cached across runs; only missing ones are rendered,
        `class_batch_size` per pipeline call, image i from seed `seed * 100_000 + i`."""
        cfg = self.cfg
        key = sha256_json({"model": model_fingerprint(cfg.model), "prompt": cfg.class_prompt, "seed": cfg.seed,
                           "resolution": self.resolution, "steps": cfg.sample_steps, "guidance": cfg.guidance_scale,
                           "scheduler": cfg.scheduler})
        folder = cache_dir("class_images") / key[:20]
        files = [folder / f"{i:05d}.png" for i in range(cfg.num_class_images)]
        images = [read_or_heal(f, load_rgb) for f in files]
        missing = [i for i, img in enumerate(images) if img is None]
        self.class_images_rendered = len(missing)
        with Progress("class images", len(missing), unit="image") as bar:
            for start in range(0, len(missing), cfg.class_batch_size):
                chunk = missing[start:start + cfg.class_batch_size]
                rendered = sample(self.pipe, [cfg.class_prompt] * len(chunk),
                                  [cfg.seed * 100_000 + i for i in chunk], cfg.sample_steps, cfg.guidance_scale,
                                  resolution=self.resolution, batch_size=cfg.class_batch_size, progress=None)
                for i, img in zip(chunk, rendered):
                    with atomic_file(files[i]) as tmp:
                        img.save(tmp, format="PNG")
                    images[i] = img.convert("RGB")
                bar.advance(len(chunk))
        return images

    def _add_pivotal_tokens(self) -> None:
        """New tokens replace the identifier in the captions; their embeddings start from the identifier's."""
        cfg = self.cfg
        if self.family == "sd3":
            raise ProxytuneError("params: supervisor.pivotal_tokens: SD3 pipelines cannot load textual inversion")
        self.tokens = pivotal_token_names(cfg.identifier, cfg.pivotal_tokens)
        self.token_ids, self.original_embeddings = {}, {}
        for name, te in self.text_encoders.items():
            tokenizer = getattr(self.pipe, TOKENIZERS[name])
            init_ids = tokenizer(cfg.identifier, add_special_tokens=False).input_ids
            tokenizer.add_tokens(self.tokens)
            te.resize_token_embeddings(len(tokenizer))
            ids = tokenizer.convert_tokens_to_ids(self.tokens)
            weight = te.get_input_embeddings().weight
            with torch.no_grad():
                weight[ids] = weight[init_ids].mean(0, keepdim=True)
            self.token_ids[name] = torch.tensor(ids, device=weight.device)
            self.original_embeddings[name] = weight.detach().clone()
        # Prompts name only the first token: `encode_prompt` expands it to all of them (maybe_convert_prompt),
        # exactly as it will for a pipeline that loaded the saved embeddings.
        self.instance_prompts = [with_token(p, cfg.identifier, self.tokens[0]) for p in self.instance_prompts]

    def _add_adapters(self) -> None:
        from peft import LoraConfig

        cfg = self.cfg

        def lora(targets):
            return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              init_lora_weights="gaussian", target_modules=targets)

        self.denoiser.add_adapter(lora(cfg.target_modules or DENOISER_TARGETS[self.family]))
        if cfg.train_text_encoder:
            for te in self.text_encoders.values():
                te.add_adapter(lora(TEXT_TARGETS))

    def _train_mode(self, training: bool) -> None:
        self.denoiser.train(training)
        for te in self.text_encoders.values():
            te.train(training and self.train_text)

    def autocast(self):
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    # ---- inputs ------------------------------------------------------------------------------------------
    def _latent_dist(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.pipe.vae.encode(pixels.to(self.pipe.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def _latents(self, cached, pixels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """A latent sample per index, from the cached distribution or by encoding the images now: both draw
        the same noise, so caching changes speed, not the run."""
        if cached is None:
            with torch.no_grad():
                cached = self._latent_dist(pixels[idx])
        else:
            cached = (cached[0][idx], cached[1][idx])
        mean, std = cached
        x = mean + std * self._noise_like(mean)
        cfg = self.pipe.vae.config
        return (x - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning through the pipeline's own `encode_prompt` (differentiable when text trains)."""
        p, dev = self.pipe, self.device
        if self.family == "sd":
            return {"encoder_hidden_states": p.encode_prompt(prompts, dev, 1, False)[0]}
        if self.family == "sdxl":
            embeds, _, pooled, _ = p.encode_prompt(prompts, device=dev, do_classifier_free_guidance=False)
            return {"encoder_hidden_states": embeds, "text_embeds": pooled}
        if self.family == "sd3":
            embeds, _, pooled, _ = p.encode_prompt(prompts, None, None, device=dev, do_classifier_free_guidance=False)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        embeds, pooled, text_ids = p.encode_prompt(
            prompts, None, device=dev, max_sequence_length=min(512, p.tokenizer_2.model_max_length))
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    def _cond(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.train_text:
            return self._encode(prompts)
        rows = [self.embeds[p] for p in prompts]
        # FLUX's text position ids have no batch dimension
        return {k: rows[0][k] if k == "txt_ids" else torch.cat([r[k] for r in rows]) for k in rows[0]}

    # ---- loss --------------------------------------------------------------------------------------------
    def _noise_like(self, local: torch.Tensor) -> torch.Tensor:
        """Noise for this process's rows, drawn for the global batch: the generator advances alike everywhere."""
        full = torch.randn((self.cfg.batch_size, *local.shape[1:]), generator=self.generator)
        return full[self.shard].to(self.device)

    def _timesteps(self) -> torch.Tensor:
        """This process's rows of the batch's timesteps: DDPM steps for the UNet families, indices into the flow
        scheduler's timesteps and sigmas (drawn from the weighting scheme's density) for the flow families."""
        cfg, sched = self.cfg, self.noise_scheduler
        steps = sched.config.num_train_timesteps
        if not self.flow:
            return torch.randint(steps, (cfg.batch_size,), generator=self.generator)[self.shard]
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(cfg.weighting_scheme, cfg.batch_size, cfg.logit_mean, cfg.logit_std,
                                                  cfg.mode_scale, generator=self.generator)[self.shard]
        return (u * steps).long().clamp(max=len(sched.timesteps) - 1)

    def _draw(self, cached, pixels, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        """One term's rows of the step: images (with replacement), their latents, noise, timesteps, prompts."""
        idx = torch.randint(len(prompts), (self.cfg.batch_size,), generator=self.generator)[self.shard]
        x0 = self._latents(cached, pixels, idx)
        return x0, self._noise_like(x0), self._timesteps(), [prompts[i] for i in idx]

    def _per_sample_loss(self, x0, noise, t, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.flow:
            return self._flow_loss(x0, noise, t, cond)
        sched, n = self.noise_scheduler, len(x0)
        noisy = sched.add_noise(x0, noise, t)
        extra = {}
        if self.family == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": self.time_ids.expand(n, -1)}
        pred = self.denoiser(noisy, t.to(self.device), encoder_hidden_states=cond["encoder_hidden_states"],
                             **extra).sample
        v_pred = sched.config.prediction_type == "v_prediction"
        target = sched.get_velocity(x0, noise, t) if v_pred else noise
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.cfg.snr_gamma > 0:  # min-SNR-gamma (Hang et al. 2023), as diffusers' --snr_gamma
            from diffusers.training_utils import compute_snr

            snr = compute_snr(sched, t).to(loss.device)
            weight = torch.clamp(snr, max=self.cfg.snr_gamma) / (snr + 1 if v_pred else snr)
            loss = loss * weight
        return loss

    def _flow_loss(self, x0, noise, idx, cond) -> torch.Tensor:
        from diffusers import FluxPipeline
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        cfg, sched, n = self.cfg, self.noise_scheduler, len(x0)
        timesteps = sched.timesteps[idx].to(self.device)
        sigmas = sched.sigmas[idx].to(self.device, torch.float32).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * x0 + sigmas * noise
        if self.family == "sd3":
            pred = self.denoiser(hidden_states=noisy, timestep=timesteps, return_dict=False,
                                 encoder_hidden_states=cond["encoder_hidden_states"],
                                 pooled_projections=cond["pooled_projections"])[0]
        else:
            _, c, h, w = x0.shape
            guidance = (torch.full((n,), cfg.flux_guidance, device=self.device)
                        if self.denoiser.config.guidance_embeds else None)
            pred = self.denoiser(
                hidden_states=FluxPipeline._pack_latents(noisy, n, c, h, w), timestep=timesteps / 1000,
                guidance=guidance, pooled_projections=cond["pooled_projections"],
                encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=cond["txt_ids"],
                img_ids=FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, self.device, x0.dtype),
                return_dict=False)[0]
            scale = self.pipe.vae_scale_factor
            pred = FluxPipeline._unpack_latents(pred, h * scale, w * scale, scale)
        weighting = compute_loss_weighting_for_sd3(cfg.weighting_scheme, sigmas)
        return (weighting.float() * (pred.float() - (noise - x0).float()) ** 2).mean(dim=(1, 2, 3))

    def train_step(self) -> dict[str, float]:
        """The instance term and the prior term (class images) in one denoiser call, as diffusers' scripts stack
        them: a small denoiser's time is per call more than per row. Each term draws its rows as it would alone,
        so the batches do not depend on the stacking; the losses do, at float-rounding level (other shapes)."""
        cfg = self.cfg
        with self.autocast():
            terms = [self._draw(self.instance_latents, self.instance_pixels, self.instance_prompts)]
            if cfg.prior_preservation:
                terms.append(self._draw(self.class_latents, self.class_pixels,
                                        [cfg.class_prompt] * len(self.class_images)))
            x0, noise, t, prompts = zip(*terms)
            per_sample = self._per_sample_loss(torch.cat(x0), torch.cat(noise), torch.cat(t),
                                               self._cond(sum(prompts, [])))
            losses = dict(zip(("instance_loss", "prior_loss"), (rows.mean() for rows in per_sample.chunk(len(terms)))))
            loss = losses["instance_loss"]
            if cfg.prior_preservation:
                loss = loss + cfg.prior_loss_weight * losses["prior_loss"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        values = {"loss": loss, **losses}
        if self.world > 1:
            self._average_gradients()
            values = dict(zip(values, self._mean_over_processes(torch.stack([v.detach() for v in values.values()]))))
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if cfg.pivotal_tokens:  # only the new tokens' rows may move (weight decay touched them all)
            for name, te in self.text_encoders.items():
                weight, keep = te.get_input_embeddings().weight, torch.ones(len(self.original_embeddings[name]),
                                                                           dtype=torch.bool)
                keep[self.token_ids[name].cpu()] = False
                with torch.no_grad():
                    weight[keep] = self.original_embeddings[name][keep].to(weight.dtype)
        return {k: v.item() for k, v in values.items()}

    def _mean_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(tensor)
        return tensor / self.world

    def _average_gradients(self) -> None:
        """Every process gets the mean of all processes' gradients: the global batch's gradient. One all-reduce
        of the flattened LoRA gradients (small) rather than DDP wrappers, which cannot reach the text encoders
        the pipeline's `encode_prompt` calls. Parameters without a gradient (a text encoder's last layer, when the
        pipeline reads the one before) are left without one, alike in every process."""
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = self._mean_over_processes(torch.cat([g.reshape(-1) for g in grads]))
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    # ---- rendering and saving ----------------------------------------------------------------------------
    def render(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        """Images from the pipeline as trained so far (eval mode), leaving every RNG of the run untouched."""
        rng = torch.get_rng_state()
        self._train_mode(False)
        try:
            with self.autocast():
                return sample(self.pipe, prompts, seeds, self.cfg.sample_steps, self.cfg.guidance_scale,
                              resolution=self.resolution, progress=None)  # a pause inside training's own bar
        finally:
            self._train_mode(True)
            torch.set_rng_state(rng)

    def validation_images(self) -> list[Image.Image]:
        cfg = self.cfg
        prompt = self.instance_prompts[0]
        if cfg.validation_prompt:
            prompt = with_token(cfg.validation_prompt, cfg.identifier, self.tokens[0] if cfg.pivotal_tokens else None)
        n = cfg.num_validation_images
        return self.render([prompt] * n, [cfg.seed + i for i in range(n)])

    def lora_layers(self) -> dict[str, dict[str, torch.Tensor]]:
        """PEFT state dicts per component name (`unet`/`transformer`, `text_encoder`, `text_encoder_2`)."""
        from peft.utils import get_peft_model_state_dict

        layers = {"transformer" if self.flow else "unet": get_peft_model_state_dict(self.denoiser)}
        if self.cfg.train_text_encoder:
            # pivotal tuning resizes the vocabulary; its embeddings go to their own file, not the LoRA
            layers.update({n: get_peft_model_state_dict(te, save_embedding_layers=False)
                           for n, te in self.text_encoders.items()})
        return layers

    def save(self, out_dir: Path, export_kohya: bool = False) -> Path:
        """Write the LoRA in diffusers' format, loadable with `pipe.load_lora_weights(out_dir)`; pivotal tokens
        go to `embeddings.safetensors` ({"clip_l", "clip_g"} x (tokens, dim), token names in the metadata)."""
        from diffusers.utils import convert_state_dict_to_diffusers

        out_dir = Path(out_dir)
        kwargs = {}
        modules = {"transformer" if self.flow else "unet": self.denoiser, **self.text_encoders}
        for name, layers in self.lora_layers().items():
            kwargs[f"{name}_lora_layers"] = layers if name == "transformer" else convert_state_dict_to_diffusers(layers)
            # The adapter config (lora_alpha above all) goes in the file's metadata, as diffusers' training
            # scripts do; without it the loader assumes alpha == rank and rescales any other LoRA.
            config = modules[name].peft_config["default"].to_dict()
            # sets in peft (target_modules); sorted, the saved metadata does not depend on the process's hash seed
            kwargs[f"{name}_lora_adapter_metadata"] = {k: sorted(v) if isinstance(v, set) else v
                                                       for k, v in config.items()}
        type(self.pipe).save_lora_weights(out_dir, safe_serialization=True, **kwargs)
        canonical_safetensors(out_dir / LORA_FILE)
        if self.cfg.pivotal_tokens:
            from safetensors.torch import save_file

            tensors = {EMBEDDING_KEYS[n]: te.get_input_embeddings().weight[self.token_ids[n]].detach().float().cpu()
                       for n, te in self.text_encoders.items()}
            save_file(tensors, str(out_dir / TEXTUAL_INVERSION_FILE), metadata={"tokens": json.dumps(self.tokens)})
        if export_kohya:
            self.save_kohya(out_dir / KOHYA_FILE)
        return out_dir / LORA_FILE

    def save_kohya(self, path: Path) -> Path:
        """The same LoRA in kohya/webui naming (`lora_unet_*`, `lora_te1_*`, `lora_te2_*` with `.alpha`)."""
        from diffusers.utils import convert_state_dict_to_kohya
        from safetensors.torch import save_file

        if self.flow:
            raise ProxytuneError(f"params: supervisor.export_kohya: kohya export covers UNet models, not {self.family}")
        peft = {f"{name}.{k}": v for name, layers in self.lora_layers().items() for k, v in layers.items()}
        kohya = convert_state_dict_to_kohya(peft)
        alpha = torch.tensor(float(self.cfg.lora_alpha))  # the converter writes alpha = rank
        kohya = {k: (alpha.clone() if k.endswith(".alpha") else v.contiguous().cpu()) for k, v in kohya.items()}
        save_file(kohya, str(path))
        return path


class ValidatingLogger:
    """Wraps a stage logger: every `every` logged steps, renders validation images with the LoRA so far and
    logs them through `log.artifact` (MLflow), under `validation/step-NNNNNN`."""

    def __init__(self, log, recipe: DreamBoothLoRA, every: int, folder: Path):
        self.log, self.recipe, self.every, self.folder = log, recipe, int(every), Path(folder)

    def metrics(self, values, step=None):
        self.log.metrics(values, step=step)
        if self.every > 0 and step and step % self.every == 0:
            out = self.folder / f"step-{step:06d}"
            out.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(self.recipe.validation_images()):
                img.save(out / f"{i:02d}.png")
            self.log.artifact(out, f"validation/step-{step:06d}")

    def artifact(self, path, folder=None):
        self.log.artifact(path, folder)

