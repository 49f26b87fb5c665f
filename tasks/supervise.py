"""Stage `supervise`: DreamBooth with LoRA and prior preservation on the diffusion supervisor.

The recipe (setup, train step, save) follows diffusers' `train_dreambooth_lora.py`: LoRA on the UNet's
attention projections through peft, the noise-prediction loss on the instance images plus
`prior_loss_weight` times the same loss on class images the frozen base model generated, so the class
noun keeps its meaning. Latents and text embeddings are computed once, since VAE and text encoder are frozen.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from proxytune.cache import checkpoint_dir
from proxytune.diffusion import load_pipeline, sample
from proxytune.images import to_tensor
from proxytune.io import atomic_dir, read_jsonl
from proxytune.params import get, model_source
from proxytune.prompts import CAPTION
from proxytune.stage import stage_task
from proxytune.training import Checkpointer, train, write_loss_csv

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class DreamBoothConfig:
    model: str
    instance_images: list[Path]
    instance_prompt: str
    class_prompt: str
    lora_rank: int = 4
    lora_alpha: int = 4
    learning_rate: float = 1e-4
    steps: int = 400
    batch_size: int = 1
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    sample_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0


class DreamBoothLoRA:
    """setup() -> train_step() x N -> save(); no orchestration inside, so tests drive it directly.

    `proxytune.training.train` runs the steps and checkpoints `trainable`, `optimizer` and `generator`.
    """

    def __init__(self, cfg: DreamBoothConfig):
        self.cfg = cfg

    def setup(self) -> None:
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.pipe = load_pipeline(cfg.model)
        self.unet, vae, text_encoder = self.pipe.unet, self.pipe.vae, self.pipe.text_encoder
        for module in (self.unet, vae, text_encoder):
            module.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                         init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        resolution = Image.open(cfg.instance_images[0]).width
        self.class_images = sample(
            self.pipe, [cfg.class_prompt] * cfg.num_class_images,
            [cfg.seed * 100_000 + i for i in range(cfg.num_class_images)],
            cfg.sample_steps, cfg.guidance_scale, resolution=resolution,
        )
        with torch.no_grad():
            self.instance_latents = self._latent_dist([Image.open(p) for p in cfg.instance_images])
            self.class_latents = self._latent_dist(self.class_images)
            self.instance_embeds = self._embed(cfg.instance_prompt)
            self.class_embeds = self._embed(cfg.class_prompt)
        self.trainable = self.unet
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=1e-2)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.unet.train()

    def _latent_dist(self, images):
        dist = self.pipe.vae.encode(to_tensor(images)).latent_dist
        return dist.mean, dist.std

    def _embed(self, prompt: str) -> torch.Tensor:
        tok = self.pipe.tokenizer(prompt, padding="max_length", truncation=True,
                                  max_length=self.pipe.tokenizer.model_max_length, return_tensors="pt")
        return self.pipe.text_encoder(tok.input_ids)[0]

    def _denoise_loss(self, latents: tuple[torch.Tensor, torch.Tensor], embeds: torch.Tensor) -> torch.Tensor:
        mean, std = latents
        idx = torch.randint(len(mean), (self.cfg.batch_size,), generator=self.generator)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=self.generator))
        x0 = x0 * self.pipe.vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=self.generator)
        t = torch.randint(self.noise_scheduler.config.num_train_timesteps, (len(x0),), generator=self.generator)
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        pred = self.unet(noisy, t, encoder_hidden_states=embeds.expand(len(x0), -1, -1)).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        return F.mse_loss(pred.float(), target.float())

    def train_step(self) -> dict[str, float]:
        instance = self._denoise_loss(self.instance_latents, self.instance_embeds)
        prior = self._denoise_loss(self.class_latents, self.class_embeds)
        loss = instance + self.cfg.prior_loss_weight * prior
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return {"loss": loss.item(), "instance_loss": instance.item(), "prior_loss": prior.item()}

    def save(self, out_dir: Path) -> Path:
        """Write the LoRA in diffusers' format, loadable with `pipe.load_lora_weights(out_dir)`."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        # The adapter config (lora_alpha above all) goes in the file's metadata, as diffusers' training
        # scripts do; without it the loader assumes alpha == rank and rescales any other LoRA.
        metadata = self.unet.peft_config["default"].to_dict()
        StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True,
                                                  unet_lora_adapter_metadata=metadata)
        return out_dir / LORA_FILE


def run(params: dict, log) -> dict:
    """Train the supervisor's LoRA on the prepared instance images; write the LoRA and class images."""
    prepared = Path("outputs/prepare")
    rows = read_jsonl(prepared / "captions.jsonl")
    class_noun = get(params, "subject.class_noun")
    s = params["supervisor"]
    cfg = DreamBoothConfig(
        model=model_source(params, "supervisor.model"),
        instance_images=[prepared / r["file"] for r in rows], instance_prompt=rows[0]["caption"],
        class_prompt=CAPTION.format(class_noun), lora_rank=int(s["lora_rank"]), lora_alpha=int(s["lora_alpha"]),
        learning_rate=float(s["learning_rate"]), steps=int(s["steps"]), batch_size=int(s["batch_size"]),
        prior_loss_weight=float(s["prior_loss_weight"]), num_class_images=int(s["num_class_images"]),
        sample_steps=int(s["sample_steps"]), guidance_scale=float(s["guidance_scale"]), seed=int(params["seed"]),
    )
    recipe = DreamBoothLoRA(cfg)
    recipe.setup()
    checkpoints = Checkpointer(checkpoint_dir("supervise", params), int(s.get("checkpoint_every", 0)))
    history = train(recipe, cfg.steps, log, checkpoints)
    out = Path("outputs/supervise")
    with atomic_dir(out) as tmp:
        recipe.save(tmp)
        (tmp / "class_images").mkdir()
        for i, img in enumerate(recipe.class_images):
            img.save(tmp / "class_images" / f"{i:03d}.png")
    write_loss_csv("outputs/supervise_loss.csv", history)
    checkpoints.clear()
    log.artifact(out / LORA_FILE, "lora")
    return {"lora_dir": str(out), "loss_csv": "outputs/supervise_loss.csv"}


supervise_task = stage_task("supervise", run)
