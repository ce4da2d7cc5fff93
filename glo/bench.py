"""python -m glo.bench: the prototype's per-image loop and glo's options side by side, same images,
same VAE.

Each method runs in a fresh process, so its peak memory (RSS on CPU, max allocated on CUDA) is its
own. Methods are lists of glo.run overrides on top of conf/run.yaml, so the "default" row is exactly
what `python -m glo.run` does. Writes bench.json and bench.md into the run directory.
"""

from __future__ import annotations

import resource
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Annotated, Any

import hydra
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig
from pydantic import Field

from glo import GloError, is_number
from glo.app.cli import (
    COMMAND_LINE_ERRORS,
    CONF,
    command_line,
    hydra_main,
    one_line,
    one_line_errors,
)
from glo.app.config import built, validate
from glo.app.typed import Count, Overrides, Publish, Schema, checked
from glo.method.drift import drift, pooled_channel_stats, pooled_covariance, spread_ratio
from glo.method.fit import fit_batch
from glo.method.metrics import psnr
from glo.method.settings import Settings
from glo.model.hardware import Speed, emulated, machine, pick_device, resolve_precision
from glo.report.bench_tables import render, tables
from glo.report.render import markdown_table, publish
from glo.store.atomic import save_json, save_text


def glo_config(overrides: list[str]) -> DictConfig:
    """conf/run.yaml with overrides, as `python -m glo.run` would compose it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="run", overrides=overrides)


def reference_loop(
    vae, x: torch.Tensor, loss, lr: float, steps: int, keep: tuple[int, ...] = ()
) -> tuple[torch.Tensor, np.ndarray, dict[int, torch.Tensor]]:
    """Returns the latents, each image's decoder passes (one forward + backward per step), and the
    latents after each number of steps in `keep`."""
    # The published prototype, kept deliberately plain: one image at a time, Adam with torch's
    # defaults, fixed budget, fp32. Its budget comes from conf/experiment/prototype.yaml.
    out, kept = [], {k: [] for k in keep}
    for i in range(len(x)):
        z = vae.encode(x[i : i + 1]).clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for step in range(1, steps + 1):
            opt.zero_grad()
            loss(vae.decode(z), x[i : i + 1]).sum().backward()
            opt.step()
            if step in kept:
                kept[step].append(z.detach().clone())
        out.append(z.detach())
    return torch.cat(out), np.full(len(x), steps), {k: torch.cat(v) for k, v in kept.items()}


def glo_method(
    cfg: DictConfig, settings: Settings, vae, x: torch.Tensor
) -> tuple[torch.Tensor, np.ndarray]:
    """What glo.run does for these images, minus Lightning and export: `fit_batch` batch by batch.
    Returns the latents and each image's decoder passes."""
    loss = instantiate(cfg.loss)
    b = cfg.batch_size
    fitted = [fit_batch(vae, x[i : i + b], settings, loss).arrays for i in range(0, len(x), b)]
    return (
        torch.from_numpy(np.concatenate([f["latents"] for f in fitted])).to(x.device),
        np.concatenate([f["passes"] for f in fitted]),
    )


def measure(
    name: str, common: list[str], overrides: list[str], reference: bool, keep: tuple[int, ...] = ()
) -> dict:
    """One method in this (fresh) process: time, peak memory, quality. The reference runs the plain
    loop with the lr and max_steps its overrides compose (experiment=prototype), and scores its
    latents after each number of steps in `keep` too (`curve`)."""
    cfg = glo_config(common + overrides)
    settings, speed = built(Settings, cfg), built(Speed, cfg)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)[0]
    # resolved once: the engine runs at what this row records
    settings = settings.replace(precision=precision)
    if emulated(precision, device):
        return {
            "method": name,
            "overrides": " ".join(overrides),
            "precision": precision,
            "skipped": (
                "not measured: this CPU has no native bf16, so reduced precision is emulated "
                "(over 100x slower per pass)"
            ),
        }
    dataset = instantiate(cfg.data)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))]).to(device)
    # not glo.run's load_model: no Lightning per row
    vae = instantiate(cfg.vae).set_speed(speed).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    kept: dict[int, torch.Tensor] = {}
    with torch.enable_grad():
        if reference:
            latents, passes, kept = reference_loop(
                vae, x, instantiate(cfg.loss), cfg.lr, cfg.max_steps, keep
            )
        else:
            latents, passes = glo_method(cfg, settings, vae, x)
    seconds = time.perf_counter() - start
    peak_mb = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ) / 2**20
    with torch.no_grad():
        one = [slice(i, i + 1) for i in range(len(x))]  # each image alone, as the reference ran it
        z0 = torch.cat([vae.encode(x[i]) for i in one])
        psnr0 = torch.cat([psnr(vae.decode(z0[i]), x[i]) for i in one])
    row = {
        "method": name,
        "overrides": " ".join(overrides),
        "images": len(x),
        "images_per_second": len(x) / seconds,
        "seconds_per_image": seconds / len(x),
        "peak_memory_mb": peak_mb,
        **quality(vae, x, z0, psnr0, latents),
        "passes_mean": float(passes.mean()),
        "precision": precision,
        "skipped": "",
    }
    if kept:
        row["curve"] = [
            {"passes": k, **quality(vae, x, z0, psnr0, z)} for k, z in sorted(kept.items())
        ]
    return row


def quality(
    vae, x: torch.Tensor, z0: torch.Tensor, psnr0: torch.Tensor, latents: torch.Tensor
) -> dict:
    """The gain of latents over the encoder's z0 (whose PSNR is psnr0), image by image as the
    reference ran them, and their drift."""
    with torch.no_grad():
        one = [slice(i, i + 1) for i in range(len(x))]
        gain = (torch.cat([psnr(vae.decode(latents[i]), x[i]) for i in one]) - psnr0).cpu().numpy()
        # no re-encode here: it costs encoder passes
        before, after = (drift(z, z0, z) for z in (z0, latents))
    std_ratio = (
        pooled_channel_stats(
            after["channel_mean"].cpu().numpy(), after["channel_std"].cpu().numpy()
        )[1]
        / pooled_channel_stats(
            before["channel_mean"].cpu().numpy(), before["channel_std"].cpu().numpy()
        )[1]
    )
    return {
        "psnr_gain_mean": float(gain.mean()),
        "improved_fraction": float((gain > 0).mean()),
        "drift_distance": float(after["drift_distance"].mean()),
        "hf_share": float(after["hf_share"].mean()),
        "hf_share_encoder": float(before["hf_share"].mean()),
        "channel_std_ratio_max": float(std_ratio.max()),
        "spread_ratio_max": spread_ratio(
            *(
                pooled_covariance(
                    d["channel_mean"].cpu().numpy(), d["channel_moment"].cpu().numpy()
                )
                for d in (after, before)
            )
        ),
        "channel_std_ratios": std_ratio.tolist(),
    }


def decode_backward_seconds(vae_overrides: list[str], size: int, repeats: int = 5) -> float:
    """Median wall time of one fp32 decode + backward, batch 1: the unit cost of every Adam step."""
    cfg = glo_config(vae_overrides)
    vae = instantiate(cfg.vae)
    z = torch.randn(1, vae.latent_channels, size // 8, size // 8, requires_grad=True)
    times = []
    for _ in range(repeats + 1):  # the first call warms up allocators and kernels
        start = time.perf_counter()
        vae.decode(z).square().mean().backward()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def run_isolated(
    name: str,
    common: list[str],
    overrides: list[str],
    reference: bool = False,
    keep: tuple[int, ...] = (),
) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, name, common, overrides, reference, keep).result()


def bench(cfg: DictConfig, out: Path) -> dict:
    checked(Bench, cfg)
    data = [
        "data=folder",
        f"data.path={cfg.data.path}",
        f"data.limit={cfg.data.limit}",
        f"data.size={cfg.data.size}",
        f"loss={cfg.loss.name}",
    ]
    # the family's vaes by name; the one vae with its path, if it has one
    vaes = list(cfg.family or [cfg.vae.name])
    commons = {v: [f"vae={v}", *data] for v in vaes}
    commons[vaes[0]] += (
        [f"vae.path={cfg.vae.path}"] if cfg.vae.get("path") and not cfg.family else []
    )
    common = commons[vaes[0]]
    unknown = sorted(set(cfg.only or ()) - set(cfg.methods))
    if unknown:
        raise GloError(f"only={list(cfg.only)}: no method named {unknown[0]} in conf/bench.yaml")
    names = [n for n in cfg.methods if not cfg.only or n in cfg.only]
    steps = glo_config(common + list(cfg.reference)).max_steps
    budgets = check_curve(cfg.curve, steps)
    for name, overrides in [("reference", cfg.reference), *((n, cfg.methods[n]) for n in names)]:
        for vae_common in commons.values():
            # a mistyped override stops the bench now, not after the rows before it have run for
            # minutes
            try:
                composed = glo_config(vae_common + list(overrides))
            except COMMAND_LINE_ERRORS as e:
                raise GloError(f"{name} {list(overrides)}: {one_line(e)}") from None
            validate(composed)
    # each round runs every row once, so a row's speedup compares it with the reference of its own
    # round
    rounds = []
    for k in range(cfg.repeats):
        rows = []
        for vae, vae_common in commons.items():
            ref = run_isolated(
                "reference",
                vae_common,
                list(cfg.reference),
                reference=True,
                keep=tuple(b for b in budgets if b < steps),
            )
            print(markdown_table([ref]), flush=True)
            these = [
                ref,
                *(run_isolated(name, vae_common, list(cfg.methods[name])) for name in names),
            ]
            for r in these:
                r["vae"] = vae
                if not r["skipped"]:
                    r["speedup"] = r["images_per_second"] / ref["images_per_second"]
                    r["gain_vs_reference_db"] = r["psnr_gain_mean"] - ref["psnr_gain_mean"]
                    r["gain_share_of_reference"] = r["psnr_gain_mean"] / ref["psnr_gain_mean"]
                    r["hf_share_ratio"] = r["hf_share"] / r["hf_share_encoder"]
            print(f"{vae} ({k + 1}/{cfg.repeats}): measured", flush=True)
            rows += these
        rounds.append(rows)
    rows = [median_row(list(same)) for same in zip(*rounds)]
    curve = [
        point
        for vae, vae_common in commons.items()
        for point in gain_curve(
            vae,
            vae_common,
            next(r for r in rows if r["vae"] == vae and r["method"] == "reference"),
            budgets,
            cfg.spread_bound,
        )
    ]
    memory = []
    if cfg.memory.enabled:
        base = [
            f"vae={cfg.memory.vae}",
            "data=folder",
            f"data.path={cfg.data.path}",
            "data.limit=1",
            f"data.size={cfg.memory.size}",
            f"max_steps={cfg.memory.steps}",
            "rel_tol=0",
            "batch_size=1",
            "precision=fp32",
        ]
        memory = [run_isolated(name, base, list(o)) for name, o in cfg.memory.methods.items()]
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        unit = pool.submit(
            decode_backward_seconds, [o for o in common if o.startswith("vae")], cfg.data.size
        ).result()
    prototype = glo_config(common + list(cfg.reference))
    result = {
        "date": datetime.now(timezone.utc).isoformat(),
        "machine": machine(),
        "decode_backward_seconds": unit,
        "config": {
            "vae": ", ".join(vaes),
            "loss": cfg.loss.name,
            "data": dict(cfg.data),
            "reference": {k: prototype[k] for k in ("lr", "max_steps")},
            "repeats": cfg.repeats,
            "spread_bound": cfg.spread_bound,
        },
        "methods": rows,
        "curve": curve,
        "memory": memory,
    }
    save_json(out / "bench.json", result)
    save_text(out / "bench.md", render(result))
    return result


class BenchData(Schema):
    path: str
    limit: Count
    size: Annotated[int, Field(ge=16, multiple_of=8)]


class Memory(Schema):
    enabled: bool
    vae: str
    size: Annotated[int, Field(ge=16, multiple_of=8)]
    steps: Count
    methods: dict[str, Overrides]


class Bench(Schema):
    """conf/bench.yaml, typed: what each key means is said there (the rows' own overrides are
    glo.run's)."""

    task: str
    vae: dict[str, Any]
    loss: dict[str, Any]
    data: BenchData
    reference: Overrides
    methods: dict[str, Overrides]
    repeats: Count
    family: Annotated[list[str], Field(min_length=1)] | None
    curve: list[int] | None
    spread_bound: Annotated[float, Field(ge=1)]
    only: list[str] | None
    publish: Publish
    section: str
    memory: Memory


def check_curve(curve: object, steps: int) -> list[int]:
    """The decoder-pass budgets of the gain curve, checked before any work: whole numbers from 2 to
    the reference's steps."""
    if curve is None:
        return []
    values = list(curve) if isinstance(curve, (list, tuple, ListConfig)) else None
    if not values or not all(is_number(b, int) and 2 <= b <= steps for b in values):
        raise GloError(
            f"curve={curve!r}: must be null or a list of decoder-pass budgets, whole numbers from "
            f"2 to the reference's {steps} steps, e.g. 'curve=[5,10,20,50]'"
        )
    return sorted(set(values))


def gain_curve(
    vae: str, common: list[str], ref: dict, budgets: list[int], bound: float
) -> list[dict]:
    """Gain after each budget of decoder passes: the prototype's from its run (its latents after
    that many steps), glo's default with max_steps = budget - 1 (each image also scores its last
    latent, half a pass). The prototype's gain under the spread bound is its gain at the largest
    budget where its spread stays within it."""
    if not budgets:
        return []
    at = {p["passes"]: p for p in ref.get("curve", [])} | {int(ref["passes_mean"]): ref}
    points = []
    for b in budgets:
        mine = run_isolated(f"default@{b}", common, [f"max_steps={b - 1}"])
        proto = at[b]
        points.append(
            {
                "vae": vae,
                "budget": b,
                "prototype_gain": proto["psnr_gain_mean"],
                "prototype_spread": proto["spread_ratio_max"],
                "glo_gain": mine["psnr_gain_mean"],
                "glo_passes": mine["passes_mean"],
                "glo_spread": mine["spread_ratio_max"],
                "glo_above": mine["psnr_gain_mean"] > proto["psnr_gain_mean"],
            }
        )
        print(f"{vae}: {b} passes measured", flush=True)
    within = [k for k, p in at.items() if p["spread_ratio_max"] <= bound]
    ref["bounded_gain"] = at[max(within)]["psnr_gain_mean"] if within else float("nan")
    ref["bounded_passes"] = max(within) if within else 0
    return points


def median_row(runs: list[dict]) -> dict:
    """One row from the same method's runs in every round: the median time and speedup, with their
    range. The gain is a median too, though every run computes the same images the same way: its
    runs show that."""
    row = dict(runs[0])
    if row["skipped"] or len(runs) == 1:
        return row
    for k in ("images_per_second", "seconds_per_image", "speedup", "psnr_gain_mean"):
        values = [r[k] for r in runs]
        row[k], row[f"{k}_runs"] = float(np.median(values)), values
    row["speedup_range"] = f"{min(row['speedup_runs']):.2f}–{max(row['speedup_runs']):.2f}"
    return row


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    with one_line_errors("glo.bench"):
        out = Path(HydraConfig.get().runtime.output_dir)
        result = bench(cfg, out)
        print(f"glo.bench: {len(result['methods'])} methods -> {out / 'bench.md'}")
        if cfg.publish:
            publish(
                Path(cfg.publish),
                f"glo.bench {cfg.section}",
                command_line("glo.bench"),
                result["machine"],
                result["date"],
                tables(result),
            )
            print(f"glo.bench: section 'glo.bench {cfg.section}' of {cfg.publish} written")


if __name__ == "__main__":
    hydra_main(main)
