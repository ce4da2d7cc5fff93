"""python -m glo.inpaint RUN_DIR: glo's latents where they land, in diffusers' inpainting pipeline's
output.

Each image of a glo run made with a mask is inpainted by every pipeline of `inpainters` twice, from
the same start noise: once conditioned on the encoder's latents (`initial_latents`,
`initial_masked_latents`), once on glo's (`latents`, `masked_latents`). The hole is the run's mask
at latent resolution (`latent_masks`, every cell the pixel hole touches), the region the pipeline
regenerates; the rest is the known region it must keep. Each output is scored against the input on
the known region, on the seam band (known pixels next to the hole), on the hole (against the ground
truth: a weak but honest signal) and, after one more 8-bit encode -> decode, on the known region
again. Writes the outputs, inpaint.json, inpaint.md and one comparison grid per pipeline.
"""

from __future__ import annotations

import sys
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from glo import GloError
from glo.app.cli import command_line, hydra_main, one_line_errors
from glo.app.config import quiet_third_parties
from glo.app.typed import Count, Device, Publish, Schema, Seed, checked
from glo.data.pixels import to_8bit
from glo.latents import find_latents
from glo.method.drift import spread_ratio
from glo.method.metrics import region_psnr, region_ssim, seam_band
from glo.model.hardware import machine, pick_device
from glo.model.vae import FrozenVAE
from glo.report.evaluation import lpips_metric, open_run
from glo.report.render import (
    describe,
    grid_figure,
    markdown_table,
    project_path,
    publish,
    save_figure,
    unit_hwc,
)
from glo.store.atomic import atomic_write, save_json, save_text

CONDITIONINGS = {
    "encoder": ("initial_latents", "initial_masked_latents"),
    "glo": ("latents", "masked_latents"),
}
REGIONS = ("known", "seam", "hole")


class Inpaint(Schema):
    """conf/inpaint.yaml, typed: what each key means is said there."""

    task: str
    run_dir: str
    inpainters: dict[str, dict[str, Any]]
    steps: Count
    seed: Seed
    prompt: str
    seam_width: Count
    limit: Count | None
    batch_size: Count
    device: Device
    grid_images: Count
    publish: Publish
    section: str


def start_noise(ids: list[str], seed: int, shape: tuple[int, ...]) -> Tensor:
    """Each image's start noise, from (seed, id): the same whatever the batch it lands in."""
    return torch.stack(
        [
            torch.from_numpy(
                np.random.default_rng((seed, zlib.crc32(i.encode()))).standard_normal(
                    shape, dtype=np.float32
                )
            )
            for i in ids
        ]
    )


def scores(
    vae: FrozenVAE, y: Tensor, x: Tensor, hole: Tensor, seam_width: int
) -> dict[str, Tensor]:
    """Per image: PSNR and SSIM of output `y` against input `x` on each region, and the known
    region's PSNR after `y` is saved as 8 bits, encoded and decoded once more (what the next
    inpainting pass starts from)."""
    regions = {"known": ~hole, "seam": seam_band(hole, seam_width), "hole": hole}
    out = {}
    for name, region in regions.items():
        out[f"{name}_psnr"] = region_psnr(y, x, region)
        out[f"{name}_ssim"] = region_ssim(y, x, region)
    with torch.no_grad():
        again = vae.decode(vae.encode(to_8bit(y)))
    out["reencoded_known_psnr"] = region_psnr(again, x, ~hole)
    return out


def conditioning_drift(
    arrays: dict[str, np.ndarray], key: str, initial: str, n: int
) -> dict[str, float]:
    """How far the latents a pipeline reads lie from the encoder's: mean relative distance, and the
    largest std ratio along any direction of channel space (1 for the encoder's own)."""
    z, z0 = arrays[key][:n].astype(np.float64), arrays[initial][:n].astype(np.float64)
    distance = np.linalg.norm((z - z0).reshape(n, -1), axis=1) / np.linalg.norm(
        z0.reshape(n, -1), axis=1
    )
    flat = lambda a: a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1)  # noqa: E731
    return {
        "drift_distance": float(distance.mean()),
        "spread_ratio": spread_ratio(np.cov(flat(z), bias=True), np.cov(flat(z0), bias=True)),
    }


def _save_png(path: Path, x: Tensor) -> None:
    pixels = (unit_hwc(x) * 255).round().astype(np.uint8)
    atomic_write(path, lambda f: Image.fromarray(pixels).save(f, format="PNG"))


def inpaint(cfg: DictConfig, out: Path) -> dict:
    checked(Inpaint, cfg)
    start = time.perf_counter()  # the whole job, loading included: what a user waits for
    run = Path(cfg.run_dir)
    arrays, metadata, vae, dataset = open_run(run, None, None)
    if "masked_latents" not in arrays or "initial_masked_latents" not in arrays:
        raise GloError(
            f"{find_latents(run)}: exported without a mask; glo.inpaint needs a run made with "
            "mask=boxes|strokes|folder"
        )
    device = pick_device(cfg.device)
    vae = vae.to(device)
    models = {row: instantiate(node) for row, node in cfg.inpainters.items()}
    for model in models.values():
        model.check(vae)
    lpips, skipped = lpips_metric()
    n = len(arrays["ids"]) if cfg.limit is None else min(int(cfg.limit), len(arrays["ids"]))
    ids = [str(i) for i in arrays["ids"][:n]]
    index = {name: i for i, name in enumerate(dataset.ids)}
    per_image: dict[str, dict[str, list[float]]] = {
        f"{r}/{c}": {} for r in models for c in CONDITIONINGS
    }
    grids: dict[str, list[dict]] = {r: [] for r in models}
    for b in range(0, n, cfg.batch_size):
        part = slice(b, min(b + cfg.batch_size, n))
        x = torch.stack([dataset[index[i]][0] for i in ids[part]]).to(device)
        latent_masks = torch.from_numpy(
            np.asarray(arrays["latent_masks"][part], dtype=np.float32)
        ).to(device)
        factor = x.shape[-1] // latent_masks.shape[-1]
        hole = latent_masks.repeat_interleave(factor, 2).repeat_interleave(factor, 3) > 0.5
        noise = start_noise(ids[part], cfg.seed, tuple(arrays["latents"].shape[1:])).to(device)
        for row, model in models.items():
            outputs = {}
            for cond, (key, masked_key) in CONDITIONINGS.items():
                z, zm = (
                    torch.from_numpy(np.asarray(arrays[k][part], dtype=np.float32)).to(device)
                    for k in (key, masked_key)
                )
                with torch.no_grad():
                    y = vae.decode(model(vae, z, zm, latent_masks, noise, cfg.steps)).clamp(-1, 1)
                found = scores(vae, y, x, hole, cfg.seam_width)
                if lpips:
                    found["lpips"] = lpips(y, x)
                for k, v in found.items():
                    per_image[f"{row}/{cond}"].setdefault(k, []).extend(v.cpu().double().tolist())
                for j, i in enumerate(ids[part]):
                    _save_png(out / "images" / row / cond / f"{i}.png", y[j])
                outputs[cond] = y
            for j in range(min(len(x), cfg.grid_images - len(grids[row]))):
                grids[row].append(
                    {
                        "title": ids[part][j],
                        "input": unit_hwc(x[j]),
                        "mask": np.repeat(hole[j, 0, :, :, None].float().cpu().numpy(), 3, 2),
                        "initial": unit_hwc(outputs["encoder"][j]),
                        "optimized": unit_hwc(outputs["glo"][j]),
                    }
                )
        print(f"glo.inpaint: {part.stop}/{n} images", flush=True)
    seconds = time.perf_counter() - start
    rows = summary_rows(per_image, arrays, n, models)
    for row in models:
        save_figure(
            grid_figure(grids[row], ("from encoder latents", "from glo latents")),
            out / f"grid_{row}.png",
        )
    made = OmegaConf.create(metadata["config"])
    mask_kind = OmegaConf.select(made, "mask.kind") or "folder"
    result = {
        "run_dir": project_path(run),
        "run_made_by": made_by(made),
        "vae": vae.info(),
        "mask": mask_kind,
        "images": n,
        "ids": ids,
        "steps": cfg.steps,
        "seed": cfg.seed,
        "seam_width": cfg.seam_width,
        "inpainters": {r: {"kind": m.kind, "source": m.source} for r, m in models.items()},
        "seconds": seconds,
        "seconds_per_image": seconds / max(n, 1),
        "machine": machine(),
        "skipped_metrics": [skipped] if skipped else [],
        "rows": rows,
        "per_image": per_image,
    }
    save_json(out / "inpaint.json", result)
    body = table_text(result, models)
    save_text(
        out / "inpaint.md",
        "# glo.inpaint\n\n"
        + body
        + "\n\n"
        + "\n".join(f"![{r}](grid_{r}.png)" for r in models)
        + "\n",
    )
    if cfg.publish:
        publish(
            Path(cfg.publish),
            f"glo.inpaint {cfg.section}",
            command_line("glo.inpaint"),
            result["machine"],
            datetime.now(timezone.utc).isoformat(),
            body,
        )
    return result


def made_by(cfg: DictConfig) -> str:
    """The glo.run settings that chose the run's images, masks and fit, so a published table names
    its data, not only a directory on the machine that made it."""
    keys = (
        "data.path",
        "data.limit",
        "data.size",
        "mask.kind",
        "mask.seed",
        "mask.known_only",
        "loss.name",
        "lr",
        "max_steps",
    )
    found = {k: OmegaConf.select(cfg, k) for k in keys}
    found["data.path"] = found["data.path"] and project_path(found["data.path"])
    return " ".join(f"{k}={v}" for k, v in found.items() if v is not None)


def summary_rows(
    per_image: dict[str, dict[str, list[float]]],
    arrays: dict[str, np.ndarray],
    n: int,
    models: dict,
) -> list[dict]:
    """One row per pipeline and conditioning: mean scores, glo's difference to the encoder's on the
    same images, and the drift of the latents that pipeline reads (blend: the image's; sd_inpaint:
    the masked image's)."""
    rows = []
    for name, model in models.items():
        for cond, (key, masked_key) in CONDITIONINGS.items():
            got = {k: np.asarray(v) for k, v in per_image[f"{name}/{cond}"].items()}
            base = {k: np.asarray(v) for k, v in per_image[f"{name}/encoder"].items()}
            row = {
                "pipeline": name,
                "kind": model.kind,
                "conditioning": cond,
                **{k: float(np.nanmean(v)) for k, v in got.items()},
            }
            for r in REGIONS:
                row[f"{r}_psnr_vs_encoder"] = float(
                    np.nanmean(got[f"{r}_psnr"] - base[f"{r}_psnr"])
                )
            read = key if model.kind == "blend" else masked_key
            row.update(
                conditioning_drift(
                    arrays, read, CONDITIONINGS["encoder"][0 if model.kind == "blend" else 1], n
                )
            )
            rows.append(row)
    return rows


def table_text(result: dict, models: dict) -> str:
    """inpaint.md's body (and the published section): what was run, the table, what it shows."""
    columns = [
        "pipeline",
        "conditioning",
        "known_psnr",
        "known_psnr_vs_encoder",
        "seam_psnr",
        "seam_psnr_vs_encoder",
        "hole_psnr",
        "hole_psnr_vs_encoder",
        "hole_ssim",
        "known_ssim",
        "reencoded_known_psnr",
        *(["lpips"] if "lpips" in result["rows"][0] else []),
        "drift_distance",
        "spread_ratio",
    ]
    table = markdown_table([{c: r[c] for c in columns} for r in result["rows"]])
    lines = [
        f"{result['images']} images of `{result['run_dir']}` (mask `{result['mask']}`; made by "
        f"glo.run `{result['run_made_by']}`), VAE `{result['vae']['name']}`; diffusers' "
        f"StableDiffusionInpaintPipeline, {result['steps']} DDIM steps, the same start noise for "
        "both conditionings. PSNR in dB against the input: `known` = outside the hole the "
        "pipeline regenerates (the mask at latent resolution), `seam` = known pixels within "
        f"{result['seam_width']} px of it, `hole` = inside it against the ground truth; "
        "`reencoded_known` = the known region after the output is saved as 8 bits, encoded and "
        "decoded once more; `*_vs_encoder` = the mean difference to the encoder's conditioning on "
        "the same images; `drift_distance`, `spread_ratio` = the latents the pipeline reads "
        "(blend: the image's, sd_inpaint: the masked image's) against the encoder's.",
        "",
        table,
        "",
    ]
    for r in result["rows"]:
        if r["conditioning"] == "glo":
            lines.append(
                f"- `{r['pipeline']}` ({r['kind']}): glo's latents change the known region by "
                f"{r['known_psnr_vs_encoder']:+.2f} dB, the seam band by "
                f"{r['seam_psnr_vs_encoder']:+.2f} dB and the hole by "
                f"{r['hole_psnr_vs_encoder']:+.2f} dB."
            )
    lines += [
        "",
        f"Time: {result['seconds']:.0f} s for {result['images']} images × {len(models)} pipelines "
        f"× 2 conditionings ({result['seconds_per_image']:.2f} s per image), on "
        f"{describe(result['machine'])}.",
    ]
    lines += [f"Not measured: {s}." for s in result["skipped_metrics"]]
    return "\n".join(lines)


def positional_run_dir(argv: list[str]) -> list[str]:
    """`glo.inpaint RUN_DIR key=value ...`: the one argument that is not an override (nor an option)
    is the run directory, quoted for Hydra's grammar."""
    plain = [a for a in argv if "=" not in a and not a.startswith("-")]
    if len(plain) > 1:
        raise GloError(f"glo.inpaint takes one run directory, got {len(plain)}: {' '.join(plain)}")
    return [
        ("run_dir='" + a.replace("\\", "\\\\").replace("'", "\\'") + "'") if a in plain else a
        for a in argv
    ]


@hydra.main(version_base="1.3", config_path="../conf", config_name="inpaint")
def main(cfg: DictConfig) -> None:
    with one_line_errors("glo.inpaint"):
        quiet_third_parties()
        out = Path(HydraConfig.get().runtime.output_dir)
        result = inpaint(cfg, out)
        for r in result["rows"]:
            if r["conditioning"] == "glo":
                print(
                    f"glo.inpaint: {r['pipeline']}: known region {r['known_psnr_vs_encoder']:+.2f} "
                    f"dB, seam {r['seam_psnr_vs_encoder']:+.2f} dB, hole "
                    f"{r['hole_psnr_vs_encoder']:+.2f} dB from glo's latents"
                )
        print(f"glo.inpaint: {out / 'inpaint.md'}")


if __name__ == "__main__":
    with one_line_errors("glo.inpaint"):
        sys.argv[1:] = positional_run_dir(sys.argv[1:])
        if not any(a.startswith("run_dir=") for a in sys.argv[1:]) and not {
            "-h",
            "--help",
            "--hydra-help",
        } & set(sys.argv[1:]):
            raise GloError(
                "usage: python -m glo.inpaint RUN_DIR [key=value ...] (RUN_DIR: a glo.run "
                "directory made with a mask)"
            )
    hydra_main(main)
