"""An inpainting diffusion model to measure glo's latents where they land, run by diffusers' own
StableDiffusionInpaintPipeline on precomputed latents (nothing is encoded again).

Two kinds, told apart by the UNet's input channels, as the pipeline tells them apart:
- `blend` (4): a text-to-image UNet; each step the pipeline pastes `image=` latents, noised to that step, back
  outside the mask, and at the last step the latents themselves, so the known region is decoded from them;
- `sd_inpaint` (9): SD's inpainting UNet, fed cat([noisy latents, mask, masked_image_latents]); nothing is pasted.
A directory (or hub repository) in diffusers' pipeline layout: `unet/`, `scheduler/`, and `text_encoder/` +
`tokenizer/` where the UNet reads a prompt; glo's small offline UNets have none and read a zero condition.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from glo import GloError
from glo.model.vae import from_hub
from glo.standin import ASSETS

if TYPE_CHECKING:
    from diffusers import SchedulerMixin, UNet2DConditionModel

    from glo.model.vae import FrozenVAE

KINDS = {4: "blend", 9: "sd_inpaint"}


@dataclass
class Inpainter:
    name: str
    source: str
    unet: UNet2DConditionModel
    scheduler: SchedulerMixin  # DDIM from the model's own noise schedule: deterministic given the start noise
    condition: Tensor  # (1, tokens, cross_attention_dim): the prompt's embedding, or zeros

    @property
    def kind(self) -> str:
        return KINDS[self.unet.config.in_channels]

    @torch.no_grad()
    def __call__(self, vae: FrozenVAE, latents: Tensor, masked_latents: Tensor, latent_masks: Tensor,
                 noise: Tensor, steps: int) -> Tensor:
        """Inpaint a batch in SD latent units: `latents` the image's (what `blend` keeps outside the hole),
        `masked_latents` the masked image's (what `sd_inpaint` reads), `latent_masks` (B,1,h,w) 1 = hole, `noise`
        the start (B,4,h,w). Returns the final latents (decode them with `vae`)."""
        try:
            from diffusers import StableDiffusionInpaintPipeline
        except ImportError as e:  # diffusers' SD pipelines import transformers, which glo.run never needs
            raise GloError(f"glo.inpaint needs transformers ({e}): pip install 'glo[inpaint]'") from None
        if vae.shift_factor:  # the pipeline scales latents but never shifts them
            raise GloError(f"glo.inpaint: vae '{vae.name}' has a shift_factor, which diffusers' SD inpainting "
                           "pipeline does not apply")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its advice on safety checkers and scheduler configs
            pipe = StableDiffusionInpaintPipeline(vae=vae.model, text_encoder=None, tokenizer=None, unet=self.unet,
                                                  scheduler=self.scheduler, safety_checker=None,
                                                  feature_extractor=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            f = pipe.vae_scale_factor
            # the hole in pixels, cell for cell: the pipeline shrinks it back by nearest sampling to latent_masks
            mask = latent_masks.float().repeat_interleave(f, 2).repeat_interleave(f, 3)
            return pipe(prompt_embeds=self.condition.expand(len(latents), -1, -1).to(latents.device),
                        image=latents, mask_image=mask, masked_image_latents=masked_latents,
                        height=latents.shape[-2] * f, width=latents.shape[-1] * f, latents=noise,
                        num_inference_steps=steps, guidance_scale=1.0, output_type="latent").images


def load_inpainter(name: str, asset: str | None = None, path: str | None = None, pretrained: str | None = None,
                   prompt: str = "") -> Inpainter:
    """The model a config names: a local directory (`path`) wins, then one shipped in glo/standin (`asset`),
    then a hub id (`pretrained`, from the cache when it is there)."""
    if path:
        root = Path(path)
        if not (root / "unet" / "config.json").is_file():
            raise GloError(f"inpainter '{name}': {root}/unet/config.json: no such file (expected a diffusers "
                           "pipeline directory with unet/ and scheduler/)")
        return Inpainter(name, str(root.resolve()), *_components(root, prompt, (root / "text_encoder").is_dir()))
    if asset:
        return Inpainter(name, f"glo/standin/{asset}", *_components(ASSETS / asset, prompt, False))
    if pretrained:
        parts = from_hub(lambda **kw: _components(pretrained, prompt, True, **kw), f"inpainter '{name}'",
                         pretrained, f"inpainters.{name}", "a diffusers pipeline directory")
        return Inpainter(name, pretrained, *parts)
    raise GloError(f"inpainter '{name}': set one of path, asset or pretrained")


def _components(source: str | Path, prompt: str, text: bool, **kw: Any) -> tuple[Any, Any, Tensor]:
    """UNet, DDIM scheduler and condition from a directory or repository in diffusers' pipeline layout."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch.float32, **kw)
        scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
    except ValueError as e:  # a config for another model
        raise GloError(f"{source}: not a diffusers UNet2DConditionModel ({(str(e).splitlines() or [''])[0]})") from None
    if unet.config.in_channels not in KINDS:
        raise GloError(f"{source}: a UNet with {unet.config.in_channels} input channels; glo.inpaint runs 4 (blend) "
                       "or 9 (sd_inpaint)")
    unet.eval().requires_grad_(False)
    if not text:
        return unet, scheduler, torch.zeros(1, 1, unet.config.cross_attention_dim)
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
    encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw).eval()
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return unet, scheduler, encoder(ids)[0]
