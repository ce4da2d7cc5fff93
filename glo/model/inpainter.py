"""An inpainting diffusion model to measure glo's latents where they land, run by diffusers' own
StableDiffusionInpaintPipeline on precomputed latents (nothing is encoded again).

Two kinds, told apart by the UNet's input channels, as the pipeline tells them apart (C latent
channels):
- `blend` (C): a text-to-image UNet; each step the pipeline pastes `image=` latents, noised to that
  step, back outside the mask, and at the last step the latents themselves, so the known region is
  decoded from them;
- `sd_inpaint` (2C+1): SD's inpainting UNet, fed cat([noisy latents, mask, masked_image_latents]);
  nothing is pasted.
A directory (or hub repository) in diffusers' pipeline layout: `unet/`, `scheduler/`, and
`text_encoder/` + `tokenizer/` where the UNet reads a prompt; glo's small offline UNets have none
and read a zero condition.
"""

from __future__ import annotations

import json
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


def unet_kind(in_channels: int, latent_channels: int) -> str | None:
    """`blend` for a UNet that reads the latents alone, `sd_inpaint` for latents, mask and masked
    latents."""
    return {latent_channels: "blend", 2 * latent_channels + 1: "sd_inpaint"}.get(in_channels)


@dataclass
class Inpainter:
    name: str
    source: str
    unet: UNet2DConditionModel
    # DDIM from the model's own noise schedule: deterministic given the start noise
    scheduler: SchedulerMixin
    condition: Tensor  # (1, tokens, cross_attention_dim): the prompt's embedding, or zeros
    # the VAE whose latents glo.train_inpaint trained it on (its glo.json)
    trained_on: str | None = None

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.out_channels)  # it predicts the noise of a latent

    @property
    def kind(self) -> str:
        return unet_kind(self.unet.config.in_channels, self.latent_channels) or "?"

    def check(self, vae: FrozenVAE) -> None:
        """A UNet reads the latent space it was trained in: refuse another VAE's latents in one
        line."""
        # the pipeline tells latents from images, and its two kinds, by 4 and 9
        if vae.latent_channels != 4:
            raise GloError(
                f"glo.inpaint: vae '{vae.name}' makes {vae.latent_channels}-channel latents, and "
                "diffusers' StableDiffusionInpaintPipeline runs only Stable Diffusion's 4-channel "
                "ones; its latents load for training with LatentDataset(..., inpainting=True) and "
                "glo.train_inpaint"
            )
        if self.trained_on and self.trained_on != vae.name:
            raise GloError(
                f"inpainter '{self.name}' ({self.source}) was trained on vae '{self.trained_on}' "
                f"latents, and the run's are vae '{vae.name}''s; choose inpainters made for that "
                "VAE"
            )
        if self.latent_channels != vae.latent_channels:
            raise GloError(
                f"inpainter '{self.name}' ({self.source}) denoises {self.latent_channels}-channel "
                f"latents, but the run's vae '{vae.name}' makes {vae.latent_channels}-channel "
                "ones; choose inpainters made for that VAE"
            )

    @torch.no_grad()
    def __call__(
        self,
        vae: FrozenVAE,
        latents: Tensor,
        masked_latents: Tensor,
        latent_masks: Tensor,
        noise: Tensor,
        steps: int,
    ) -> Tensor:
        """Inpaint a batch in SD latent units: `latents` the image's (what `blend` keeps outside the
        hole), `masked_latents` the masked image's (what `sd_inpaint` reads), `latent_masks`
        (B,1,h,w) 1 = hole, `noise` the start (B,C,h,w). Returns the final latents (decode them with
        `vae`)."""
        try:
            from diffusers import StableDiffusionInpaintPipeline
        # diffusers' SD pipelines import transformers, which glo.run never needs
        except ImportError as e:
            raise GloError(
                f"glo.inpaint needs transformers ({e}): pip install 'glo[inpaint]'"
            ) from None
        if vae.shift_factor:  # the pipeline scales latents but never shifts them
            raise GloError(
                f"glo.inpaint: vae '{vae.name}' has a shift_factor, which diffusers' SD inpainting "
                "pipeline does not apply"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its advice on safety checkers and scheduler configs
            pipe = StableDiffusionInpaintPipeline(
                vae=vae.model,
                text_encoder=None,
                tokenizer=None,
                unet=self.unet,
                scheduler=self.scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.set_progress_bar_config(disable=True)
            f = pipe.vae_scale_factor
            # the hole in pixels, cell for cell: the pipeline shrinks it back by nearest sampling to
            # latent_masks
            mask = latent_masks.float().repeat_interleave(f, 2).repeat_interleave(f, 3)
            return pipe(
                prompt_embeds=self.condition.expand(len(latents), -1, -1).to(latents.device),
                image=latents,
                mask_image=mask,
                masked_image_latents=masked_latents,
                height=latents.shape[-2] * f,
                width=latents.shape[-1] * f,
                latents=noise,
                num_inference_steps=steps,
                guidance_scale=1.0,
                output_type="latent",
            ).images


def load_inpainter(
    name: str,
    asset: str | None = None,
    path: str | None = None,
    pretrained: str | None = None,
    prompt: str = "",
) -> Inpainter:
    """The model a config names: a local directory (`path`) wins, then one shipped in glo/standin
    (`asset`), then a hub id (`pretrained`, from the cache when it is there)."""
    if path:
        root = Path(path)
        if not (root / "unet" / "config.json").is_file():
            raise GloError(
                f"inpainter '{name}': {root}/unet/config.json: no such file (expected a diffusers "
                "pipeline directory with unet/ and scheduler/)"
            )
        return Inpainter(
            name,
            str(root.resolve()),
            *_components(root, prompt, (root / "text_encoder").is_dir()),
            trained_on(root),
        )
    if asset:
        return Inpainter(
            name,
            f"glo/standin/{asset}",
            *_components(ASSETS / asset, prompt, False),
            trained_on(ASSETS / asset),
        )
    if pretrained:
        parts = from_hub(
            lambda **kw: _components(pretrained, prompt, True, **kw),
            f"inpainter '{name}'",
            pretrained,
            f"inpainters.{name}",
            "a diffusers pipeline directory",
        )
        return Inpainter(name, pretrained, *parts)
    raise GloError(f"inpainter '{name}': set one of path, asset or pretrained")


def trained_on(root: Path) -> str | None:
    """The VAE a glo-trained model learned the latents of, from the glo.json glo.train_inpaint
    writes beside it."""
    record = root / "glo.json"
    return json.loads(record.read_text()).get("vae") if record.is_file() else None


def _components(source: str | Path, prompt: str, text: bool, **kw: Any) -> tuple[Any, Any, Tensor]:
    """UNet, DDIM scheduler and condition from a directory or repository in diffusers' pipeline
    layout."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", torch_dtype=torch.float32, **kw
        )
        scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
    except ValueError as e:  # a config for another model
        raise GloError(
            f"{source}: not a diffusers UNet2DConditionModel ({(str(e).splitlines() or [''])[0]})"
        ) from None
    c = unet.config.out_channels
    if unet_kind(unet.config.in_channels, c) is None:
        raise GloError(
            f"{source}: a UNet with {unet.config.in_channels} input channels for {c}-channel "
            f"latents; glo.inpaint runs {c} (blend) or {2 * c + 1} (sd_inpaint)"
        )
    unet.eval().requires_grad_(False)
    if not text:
        return unet, scheduler, torch.zeros(1, 1, unet.config.cross_attention_dim)
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
    encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw).eval()
    ids = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        return unet, scheduler, encoder(ids)[0]
