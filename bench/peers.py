"""Peer implementations of the jobs our code does, built on the same weights, for bench/peers_bench.py and the
equality tests: transformers' own Janus image generation, transformers' `generate` driving Lumina-mGPT's
Chameleon, plain per-image DINO/CLIP scoring loops, and the DreamBooth LoRA step as diffusers'
`examples/dreambooth/train_dreambooth_lora.py` builds it. Each returns what ours returns, so a caller can assert
equal outputs before timing either."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------------------
# Janus-Pro: JanusForConditionalGeneration.generate(generation_mode="image")


def janus_generate(student, prompts: list[str], cfg_scale: float, seed: int) -> torch.Tensor:
    """Image codes from transformers' Janus image generation (its own CFG loop, static cache, global RNG seeded
    as our sampler seeds its generator). The published generation_config carries the BOI/pad/BOS ids; a
    `save_pretrained` replica has the defaults, so they are set as the release sets them."""
    config = student.model.generation_config
    config.generation_kwargs = {"boi_token_id": student.boi_id}
    config.pad_token_id, config.bos_token_id = student.pad_id, student.bos_id
    batch = student.prompt_ids(prompts)
    torch.manual_seed(seed)
    return student.model.generate(**batch, generation_mode="image", do_sample=True, guidance_scale=cfg_scale,
                                  top_k=None, top_p=None, temperature=1.0)


# -----------------------------------------------------------------------------------------------------------
# Lumina-mGPT: ChameleonForConditionalGeneration.generate


class ImageLayout:
    """Logits processor for transformers' `generate`: Lumina-mGPT's image turn, i.e. only image tokens, and the
    end-of-line token after every `grid` codes (our sampler forces it without a step)."""

    def __init__(self, prompt_len: int, image_ids: torch.Tensor, eol_id: int, grid: int):
        self.prompt_len, self.image_ids, self.eol, self.grid = prompt_len, image_ids, eol_id, grid

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1] - self.prompt_len
        allowed = torch.tensor([self.eol]) if (n + 1) % (self.grid + 1) == 0 else self.image_ids
        out = torch.full_like(scores, float("-inf"))
        out[:, allowed] = scores[:, allowed]
        return out


def chameleon_generate(student, prompts: list[str], cfg_scale: float) -> torch.Tensor:
    """Greedy image codes from `ChameleonForConditionalGeneration.generate`: the prompt turn and image header
    left-padded, transformers' CFG for decoder-only models (a second, unconditional stream starting at the
    image header, guided in log-softmax space: the same argmax), `ImageLayout` for the rest.

    transformers' Chameleon forward sets every image token's logit to the dtype's minimum (it is a text
    chat model there), so no image could come out; Lumina-mGPT's own fork drops that mask, and so does this
    peer, by emptying the image-token list the mask reads (restored afterwards)."""
    from transformers import LogitsProcessorList

    from ar_models.lumina_mgpt import PROMPT_TEMPLATE

    tok, g = student.tokenizer, student.grid
    text = [PROMPT_TEMPLATE.format(w=student.image_size, h=student.image_size, prompt=p) for p in prompts]
    rows = [[tok.bos_token_id, *ids, student.eot_id, *student.header_ids.tolist()]
            for ids in tok(text, add_special_tokens=False)["input_ids"]]
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), tok.pad_token_id)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, L - len(row):], mask[b, L - len(row):] = torch.tensor(row), 1
    mapping = student.decoder.model.vocabulary_mapping
    masked = mapping.image_tokens
    mapping.image_tokens = []
    try:
        out = student.decoder.generate(
            ids, attention_mask=mask, max_new_tokens=g * (g + 1) - 1, do_sample=False, guidance_scale=cfg_scale,
            negative_prompt_ids=student.header_ids.expand(len(rows), -1), pad_token_id=tok.pad_token_id,
            logits_processor=LogitsProcessorList([ImageLayout(L, student.image_ids, student.eol_id, g)]))
    finally:
        mapping.image_tokens = masked
    body = torch.cat([out[:, L:], torch.full((len(rows), 1), student.eol_id)], dim=1)
    codes_of = torch.full((int(student.image_ids.max()) + 1,), -1, dtype=torch.long)
    codes_of[student.image_ids] = torch.arange(len(student.image_ids))
    return codes_of[body.view(len(rows), g, g + 1)[..., :g].flatten(1)]


# -----------------------------------------------------------------------------------------------------------
# DreamBench scoring: one image at a time through the models' own loaders


class PerImageScorer:
    """DINO, CLIP-I and CLIP-T per distinct prompt as a plain loop computes them: the models loaded once through
    their own loaders (transformers ViTModel, open_clip), then every image embedded alone and cosine
    similarities averaged."""

    def __init__(self, dino_dir: str, clip_name: str, clip_weights: str, clip_config_dir: str):
        import open_clip
        from transformers import ViTImageProcessorPil, ViTModel

        self.vit = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval()
        self.vit_pre = ViTImageProcessorPil.from_pretrained(dino_dir)  # the PIL resize DINO was published with
        open_clip.add_model_config(f"{clip_config_dir}/{clip_name}.json")
        self.clip, _, self.clip_pre = open_clip.create_model_and_transforms(clip_name, pretrained=clip_weights)
        self.clip.eval()
        self.tokenize = open_clip.get_tokenizer(clip_name)

    def dino(self, img) -> torch.Tensor:
        return F.normalize(self.vit(**self.vit_pre(images=img, return_tensors="pt")).last_hidden_state[:, 0], dim=-1)[0]

    def clip_image(self, img) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(self.clip_pre(img)[None]), dim=-1)[0]

    @torch.inference_mode()
    def scores(self, generated, prompts: list[str], references) -> list[dict]:
        gen_d, gen_c = [self.dino(im) for im in generated], [self.clip_image(im) for im in generated]
        ref_d, ref_c = [self.dino(im) for im in references], [self.clip_image(im) for im in references]
        rows = []
        for prompt in dict.fromkeys(prompts):
            text = F.normalize(self.clip.encode_text(self.tokenize([prompt])), dim=-1)[0]
            idx = [i for i, p in enumerate(prompts) if p == prompt]
            rows.append({
                "prompt": prompt, "images": len(idx),
                "dino": sum(float(gen_d[i] @ r) for i in idx for r in ref_d) / (len(idx) * len(ref_d)),
                "clip_i": sum(float(gen_c[i] @ r) for i in idx for r in ref_c) / (len(idx) * len(ref_c)),
                "clip_t": sum(float(gen_c[i] @ text) for i in idx) / len(idx),
            })
        return rows


# -----------------------------------------------------------------------------------------------------------
# DreamBooth LoRA: the training step of diffusers' train_dreambooth_lora.py


@dataclass
class ScriptDreamBooth:
    """The example script's SD training state: components loaded per subfolder, LoRA on the UNet's attention,
    `--cache_latents` (each image's latent distribution kept, sampled every step),
    `--pre_compute_text_embeddings`, `--with_prior_preservation` (instance and class rows in one batch, one
    UNet forward, loss split with `chunk(2)`), AdamW, grad-norm clipping at 1.0."""

    unet: torch.nn.Module
    scheduler: object
    instance_latents: tuple[torch.Tensor, torch.Tensor]  # (mean, std) of every instance image's latent
    class_latents: tuple[torch.Tensor, torch.Tensor]
    instance_embeds: torch.Tensor  # (n_instance, T, D): each image's caption, encoded once
    class_embeds: torch.Tensor
    scaling_factor: float
    batch_size: int
    prior_loss_weight: float
    generator: torch.Generator
    optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def load(cls, model: str, lora_state: dict, instance_pixels, class_pixels, instance_embeds, class_embeds,
             cfg, generator: torch.Generator) -> ScriptDreamBooth:
        """`lora_state`: the LoRA tensors to start from (ours, so both runs start from the same weights)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig, set_peft_model_state_dict

        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
        unet.requires_grad_(False)
        vae.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        set_peft_model_state_dict(unet, lora_state)
        with torch.no_grad():
            dists = [vae.encode(p).latent_dist for p in (instance_pixels, class_pixels)]
        state = cls(unet.train(), DDPMScheduler.from_pretrained(model, subfolder="scheduler"),
                    *[(d.mean, d.std) for d in dists], instance_embeds, class_embeds, vae.config.scaling_factor,
                    cfg.batch_size, cfg.prior_loss_weight, generator)
        params = [p for p in unet.parameters() if p.requires_grad]
        state.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2)
        return state

    def _draw(self, latents, embeds):
        """One half of the batch: images, their latents sampled from the cached distributions, noise, timesteps.
        Drawn in the order ours draws them, from the same generator, so both see the same batch."""
        n = len(embeds)
        idx = torch.randint(n, (self.batch_size,), generator=self.generator)
        mean, std = latents[0][idx], latents[1][idx]
        x0 = (mean + std * torch.randn(mean.shape, generator=self.generator)) * self.scaling_factor
        noise = torch.randn(x0.shape, generator=self.generator)
        t = torch.randint(self.scheduler.config.num_train_timesteps, (self.batch_size,), generator=self.generator)
        return self.scheduler.add_noise(x0, noise, t), noise, t, embeds[idx]

    def train_step(self) -> float:
        noisy, noise, t, embeds = (torch.cat(parts) for parts in zip(self._draw(self.instance_latents,
                                                                                self.instance_embeds),
                                                                     self._draw(self.class_latents, self.class_embeds)))
        pred = self.unet(noisy, t, embeds, return_dict=False)[0]
        pred, prior_pred = pred.chunk(2)
        target, prior_target = noise.chunk(2)
        loss = F.mse_loss(pred.float(), target.float()) + self.prior_loss_weight * F.mse_loss(
            prior_pred.float(), prior_target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.unet.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()
