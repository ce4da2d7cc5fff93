"""Load a frozen diffusers autoencoder and expose encode/decode in the diffusion model's latent
units.

Two classes: AutoencoderKL (SD, SDXL, SD3, FLUX: a posterior, a scaling and shift factor) and
AutoencoderTiny (TAESD and its siblings: a deterministic encoder, latents already in the diffusion
model's units), from a hub id, a diffusers directory, a single SD weights file, or TAESD's original
encoder/decoder files.

diffusers is imported where a model is built, not with this module: it takes seconds, and every tool
checks its settings (and refuses a typo) before it builds one.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import torch
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.utils import logging as hub_logging
from torch import Tensor, nn

from glo import GloError, is_number
from glo.pretrained import PRETRAINED
from glo.standin import ASSETS

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, AutoencoderTiny

    from glo.model.hardware import Speed

log = logging.getLogger("glo")
T = TypeVar("T")
CLASSES = ("AutoencoderKL", "AutoencoderTiny")
# TAESD's original files, as A1111 and ComfyUI keep them: <model>_encoder.<ext> beside
# <model>_decoder.<ext>
ORIGINAL = re.compile(r"(.+)_(encoder|decoder)\.(safetensors|pth)")


class FrozenVAE(nn.Module):
    """An autoencoder whose weights never train; latents are scaled as the diffusion model scales
    them."""

    def __init__(self, model: AutoencoderKL | AutoencoderTiny, name: str, source: str) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name, self.source = name, source
        self.scaling_factor = float(model.config.scaling_factor)
        self.shift_factor = float(model.config.get("shift_factor") or 0.0)
        self.latent_channels = int(model.config.latent_channels)
        # TAESD's encoder is deterministic
        self.has_posterior = type(model).__name__ != "AutoencoderTiny"
        self.channels_last = False

    def set_speed(self, speed: Speed) -> FrozenVAE:
        self.channels_last = speed.channels_last
        if speed.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if speed.checkpointing:
            self.model.enable_gradient_checkpointing()
        if speed.tile_size:
            self.model.enable_tiling()
            self.model.tile_sample_min_size, self.model.tile_latent_min_size = (
                speed.tile_size,
                speed.tile_size // 8,
            )
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """(B,3,H,W) in [-1,1] -> the posterior mean in SD units: the encoder's best guess, not a
        sample."""
        return self.posterior(x)[0]

    @torch.no_grad()
    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The encoder's posterior mean (what `encode` returns) and std, both in SD units; no std
        for a deterministic encoder."""
        if not self.has_posterior:
            return (self.model.encode(x).latents - self.shift_factor) * self.scaling_factor, None
        dist = self.model.encode(x).latent_dist
        return (dist.mean - self.shift_factor) * self.scaling_factor, dist.std * self.scaling_factor

    def decode(self, z: Tensor) -> Tensor:
        """SD latent -> (B,3,H,W), unclamped so the loss keeps gradients on saturated pixels."""
        z = z / self.scaling_factor + self.shift_factor
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        return self.model.decode(z).sample

    def info(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "class": type(self.model).__name__,
            "latent_channels": self.latent_channels,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
        }


def load_vae(
    name: str,
    pretrained: str | None = None,
    subfolder: str | None = None,
    path: str | None = None,
    asset: str | None = None,
    config: dict | None = None,
    seed: int = 0,
    rotation_seed: int | None = None,
    latent_scale: float = 1.0,
    latent_channels: int | None = None,
) -> FrozenVAE:
    """Build the VAE a config names: a local directory or weights file (`path`, a file in `config`'s
    architecture) wins, then weights shipped in the package (`asset`), then a random `config`, then
    a hub id. latent_channels, where set, is what the weights must have. rotation_seed and
    latent_scale derive a variant of it (`derive`), to check that glo's defaults do not depend on
    its coordinates."""
    if latent_channels is not None and not (
        is_number(latent_channels, int) and latent_channels >= 1
    ):
        raise GloError(
            f"vae.latent_channels={latent_channels!r}: must be null or a whole number >= 1, e.g. 4"
        )
    vae = _load(name, pretrained, subfolder, path, asset, config, seed)
    if latent_channels is not None and vae.latent_channels != latent_channels:
        raise GloError(
            f"vae '{name}': {vae.source} holds {vae.latent_channels}-channel latents, but "
            f"vae.latent_channels={latent_channels}; pick the vae config made for these weights"
        )
    if rotation_seed is not None or latent_scale != 1.0:
        derive(vae, rotation_seed, latent_scale)
    return vae


def asset_folder(asset: str) -> Path:
    """A model shipped in the package, by directory name: real pretrained ones in glo/pretrained,
    glo's own in glo/standin."""
    return PRETRAINED / asset if (PRETRAINED / asset).is_dir() else ASSETS / asset


def derive(vae: FrozenVAE, rotation_seed: int | None, latent_scale: float) -> None:
    """The same VAE in other latent coordinates, images in and out unchanged: the latent mean mixed
    by a random orthogonal 4x4 map (seeded) folded into quant_conv and post_quant_conv, and latents
    latent_scale times as large in SD units (the scaling factor times latent_scale, as when a VAE's
    factor was not fitted to its latents). The posterior's log-variance is left as it is: a diagonal
    posterior cannot be rotated (anchor_to=posterior reads it in the original coordinates)."""
    if not (is_number(latent_scale) and latent_scale > 0):
        raise GloError(f"vae.latent_scale={latent_scale!r}: must be a number > 0")
    if rotation_seed is not None:
        # a shift applies to every channel alike and would not commute with the rotation
        if vae.shift_factor:
            raise GloError(f"vae '{vae.name}': rotation_seed needs a VAE without a shift_factor")
        # nowhere to fold the map: the decoder opens with an elementwise tanh
        if not vae.has_posterior:
            raise GloError(
                f"vae '{vae.name}': rotation_seed needs an AutoencoderKL (quant_conv and "
                "post_quant_conv hold the map); an AutoencoderTiny has neither"
            )
        c = vae.latent_channels
        q, r = torch.linalg.qr(
            torch.randn(
                c, c, generator=torch.Generator().manual_seed(rotation_seed), dtype=torch.float64
            )
        )
        # uniformly distributed over the orthogonal maps
        rot = (q * torch.sign(torch.diagonal(r))).float()
        with torch.no_grad():
            quant, post = vae.model.quant_conv, vae.model.post_quant_conv
            quant.weight[:c] = torch.einsum("ij,jkxy->ikxy", rot, quant.weight[:c])
            quant.bias[:c] = rot @ quant.bias[:c]
            # W R^T: post(R z) = post(z)
            post.weight.copy_(torch.einsum("ijxy,kj->ikxy", post.weight, rot))
        vae.source += f" rotated:{rotation_seed}"
    if latent_scale != 1.0:
        vae.scaling_factor *= latent_scale
        vae.model.register_to_config(scaling_factor=vae.scaling_factor)
        vae.source += f" scaled:{latent_scale:g}"


def _load(
    name: str,
    pretrained: str | None,
    subfolder: str | None,
    path: str | None,
    asset: str | None,
    config: dict | None,
    seed: int,
) -> FrozenVAE:
    if path:
        file = Path(path)
        # one of a TAESD pair: the pair it belongs to
        if file.is_file() and (m := ORIGINAL.fullmatch(file.name)):
            return FrozenVAE(
                _from_original(*original_pair(file.parent, m[1])), name, str(file.parent.resolve())
            )
        model = _from_file(file, config) if file.is_file() else _from_directory(file, name)
        return FrozenVAE(model, name, str(file.resolve()))
    if asset:
        folder = asset_folder(asset)
        return FrozenVAE(_from_directory(folder, name), name, f"glo/{folder.parent.name}/{asset}")
    if config:
        import diffusers

        config = dict(config)
        kind = config.pop("_class_name", "AutoencoderKL")
        if kind not in CLASSES:
            raise GloError(f"vae.config._class_name={kind}: must be one of {', '.join(CLASSES)}")
        torch.manual_seed(seed)  # random weights, but the same ones every run
        return FrozenVAE(getattr(diffusers, kind)(**config), name, f"random:{seed}")
    if pretrained:
        return FrozenVAE(
            _from_hub(name, pretrained, subfolder),
            name,
            f"{pretrained}/{subfolder or ''}".rstrip("/"),
        )
    raise GloError(f"vae '{name}': set one of vae.path, vae.pretrained or vae.config")


def _from_directory(path: Path, name: str) -> AutoencoderKL | AutoencoderTiny:
    """Accept a VAE directory, a whole SD pipeline directory (whose VAE lives in `vae/`), or a
    folder of TAESD's original encoder/decoder files."""
    if not path.is_dir():
        raise GloError(f"vae.path={path}: no such directory")
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            try:
                return _pretrained(folder, local_files_only=True)
            except (OSError, ValueError) as e:
                why = _first_line(e)
                raise GloError(
                    f"vae.path={folder}: not a loadable autoencoder directory ({why})"
                ) from None
    if any(ORIGINAL.fullmatch(f.name) for f in path.iterdir()):
        return _from_original(*original_pair(path, name))
    raise GloError(
        f"vae.path={path}: no config.json (a directory written by save_pretrained) and no TAESD "
        "<model>_encoder.safetensors / <model>_decoder.safetensors pair"
    )


def original_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """The one `<model>_encoder.*` / `<model>_decoder.*` pair in a folder (with several, the one
    named `name`)."""
    pairs: dict[str, dict[str, Path]] = {}
    for f in sorted(folder.iterdir()):
        if m := ORIGINAL.fullmatch(f.name):
            pairs.setdefault(m[1], {}).setdefault(m[2], f)
    if len(pairs) > 1 and name not in pairs:
        raise GloError(
            f"vae.path={folder}: holds {len(pairs)} encoder/decoder pairs ({', '.join(pairs)}); "
            f"pick one with vae.name={next(iter(pairs))}"
        )
    model, pair = (name, pairs[name]) if name in pairs else next(iter(pairs.items()))
    for part, other in (("encoder", "decoder"), ("decoder", "encoder")):
        if part not in pair:
            raise GloError(
                f"vae.path={folder}: {pair[other].name} has no {model}_{part}.safetensors (or "
                ".pth) beside it"
            )
    return pair["encoder"], pair["decoder"]


def _from_original(encoder: Path, decoder: Path) -> AutoencoderTiny:
    """TAESD's original files (nn.Sequential keys `0.weight`, ...) as diffusers' AutoencoderTiny,
    its latent channels read from the weights. The original decoder's layer 0 is its tanh clamp,
    which diffusers applies in forward: its layer N is diffusers' N - 1."""
    from diffusers import AutoencoderTiny

    states = {}
    for path, part, first in ((encoder, "encoder", "0.weight"), (decoder, "decoder", "1.weight")):
        state = _read_weights(path)
        w = state.get(first)
        if w is None or w.ndim != 4:
            other = (
                "decoder" if "1.weight" in state else "encoder" if "0.weight" in state else "TAESD"
            )
            raise GloError(
                f"vae.path={path}: holds no TAESD {part} (its keys are a {other}'s); expected "
                f"<model>_{part}.* to be the {part}"
            )
        if part == "encoder" and w.shape[1] != 3:
            raise GloError(
                f"vae.path={path}: its first layer takes {w.shape[1]} channels, not an image's 3"
            )
        states[part] = state
    enc, dec = states["encoder"], states["decoder"]
    last = max(int(k.split(".")[0]) for k in enc)
    channels, decoder_channels = enc[f"{last}.weight"].shape[0], dec["1.weight"].shape[1]
    if channels != decoder_channels:
        raise GloError(
            f"vae.path={encoder.parent}: {encoder.name} makes {channels}-channel latents but "
            f"{decoder.name} reads {decoder_channels}: not one model's pair"
        )
    model = AutoencoderTiny(latent_channels=channels)
    state = {f"encoder.layers.{k}": v.float() for k, v in enc.items()}
    for k, v in dec.items():
        layer, rest = k.split(".", 1)
        state[f"decoder.layers.{int(layer) - 1}.{rest}"] = v.float()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # "Error(s) in loading state_dict ...", then one line per mismatch
        why = (str(e).splitlines()[1:] or [""])[0].strip()
        raise GloError(
            f"vae.path={encoder.parent}: {encoder.name} and {decoder.name} are not TAESD's "
            f"architecture ({why})"
        ) from None
    return model


def _read_weights(path: Path) -> dict[str, Tensor]:
    """A safetensors or torch file's tensors, on the CPU; anything unreadable is one line."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, torch.load and pickle each raise their own kinds
        raise GloError(f"vae.path={path}: not a readable weights file ({_first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise GloError(f"vae.path={path}: holds no state dict of tensors")
    if not all(k.split(".")[0].isdigit() for k in state):
        raise GloError(
            f"vae.path={path}: not TAESD's original layout (keys such as "
            f"{next(iter(state), '')!r}, expected 0.weight, 1.conv.0.bias, ...)"
        )
    return state


def _from_file(path: Path, config: dict | None) -> AutoencoderKL:
    """One weights file, as SD's original releases ship VAEs
    (vae-ft-mse-840000-ema-pruned.safetensors) or inside a whole SD checkpoint. It holds no
    architecture, so vae.config gives it (vae=sd_file), and nothing is fetched. diffusers'
    from_single_file leaves weights the file lacks at random, silently: glo loads strictly
    instead."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        load_single_file_checkpoint,
    )

    if not config:
        raise GloError(
            f"vae.path={path}: a single weights file holds no architecture; run with vae=sd_file "
            f"vae.path={path} (the SD VAE's; SDXL's file also needs "
            "vae.config.scaling_factor=0.13025)"
        )
    model = AutoencoderKL(**config)
    try:
        state = load_single_file_checkpoint(str(path))  # a file that exists: never the hub
    # safetensors, torch.load and pickle each raise their own kinds, wrapped by diffusers
    except Exception as e:
        root = e
        while root.__cause__ or root.__context__:
            root = root.__cause__ or root.__context__
        raise GloError(
            f"vae.path={path}: not a readable weights file ({_first_line(root)})"
        ) from None
    expected = set(model.state_dict())
    if set(state) != expected:  # not diffusers' names: the original (LDM) layout, renamed
        state = convert_ldm_vae_checkpoint(state, model.config)
    missing = sorted(expected - set(state))
    if missing:
        raise GloError(
            f"vae.path={path}: {len(missing)} of the VAE's {len(expected)} weights are not in the "
            f"file (e.g. {missing[0]}); it holds no SD VAE, or not one of vae.config's architecture"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # "Error(s) in loading state_dict ...", then one line per mismatch
        raise GloError(
            f"vae.path={path}: not vae.config's architecture ({str(e).splitlines()[1].strip()})"
        ) from None
    return model


def _from_hub(name: str, repo: str, subfolder: str | None) -> AutoencoderKL | AutoencoderTiny:
    return from_hub(
        lambda **kw: _pretrained(repo, subfolder=subfolder, **kw),
        f"VAE '{name}'",
        repo,
        "vae",
        "a diffusers VAE directory, or a folder of TAESD encoder/decoder files",
    )


def from_hub(load: Callable[..., T], what: str, repo: str, key: str, directory: str) -> T:
    """`load(**kwargs)` from the local Hugging Face cache if it is there, else online when allowed;
    every failure is one line naming `what`, `repo` and the offline alternative `{key}.path=DIR` (a
    `directory`)."""
    hub_logging.set_verbosity_error()  # no "Retrying in 8s" lines while the hub is unreachable
    try:
        return load(local_files_only=True)
    except OSError:
        pass
    fix = (
        f"cannot load {what} ({repo}): not in the Hugging Face cache and the hub is unreachable; "
        f"download it where there is network, or pass {key}.path=DIR ({directory})"
    )
    # huggingface_hub's spellings
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "on", "true", "yes"):
        raise GloError(fix)
    # Unreachable, the hub retries for tens of seconds before it gives up: say what the wait is
    log.info(
        "%s is not in the Hugging Face cache: downloading it (HF_HUB_OFFLINE=1 fails at once when "
        "offline)",
        repo,
    )
    try:
        return load()
    except OSError as e:
        # the hub answered: no such repository, for you
        if isinstance(e.__context__, RepositoryNotFoundError):
            raise GloError(
                f"cannot load {what}: the Hugging Face hub has no repository {repo} you may read "
                "(removed, renamed, or gated: accept its terms and log in with `hf auth login`); "
                f"set {key}.pretrained=REPO, or pass {key}.path=DIR"
            ) from None
        raise GloError(fix) from None


def _pretrained(source: str | Path, **kwargs) -> AutoencoderKL | AutoencoderTiny:
    """from_pretrained of the class its config.json names, in fp32 (latents are optimized in fp32
    even from fp16 files), and without the hub's advice about optional packages: failures get our
    own one line."""
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kind = diffusers.AutoencoderKL.load_config(source, **kwargs).get(
            "_class_name", "AutoencoderKL"
        )
        if kind not in CLASSES:
            raise ValueError(f"its config.json names {kind}; glo loads {' or '.join(CLASSES)}")
        return getattr(diffusers, kind).from_pretrained(
            source, low_cpu_mem_usage=False, torch_dtype=torch.float32, **kwargs
        )


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
