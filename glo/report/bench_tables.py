"""glo.bench's tables: bench.md, and the section it publishes into docs/figures.md."""

from __future__ import annotations

from glo.report.render import describe, markdown_table


def render(result: dict) -> str:
    """bench.md: the machine, then the tables."""
    m = result["machine"]
    return "\n".join(
        [
            f"# glo.bench — {result['date'][:10]}",
            "",
            f"Machine: {describe(m)}; {m['platform']}, torch {m['torch']}.",
            "",
            tables(result),
        ]
    )


def tables(result: dict) -> str:
    repeats = result["config"]["repeats"]
    family = len({r["vae"] for r in result["methods"]}) > 1
    cols = (
        *(("vae",) if family else ()),
        "method",
        "images_per_second",
        "seconds_per_image",
        "speedup",
        *(("speedup_range",) if repeats > 1 else ()),
        "psnr_gain_mean",
        "gain_vs_reference_db",
        "improved_fraction",
        "passes_mean",
        "drift_distance",
        "hf_share",
        "hf_share_encoder",
        "channel_std_ratio_max",
        "spread_ratio_max",
        "precision",
        "peak_memory_mb",
        "overrides",
    )
    c = result["config"]
    text = [
        f"VAE `{c['vae']}`, {c['data']['limit']} images from `{c['data']['path']}` at "
        f"{c['data']['size']} px; reference: per-image Adam, {c['reference']['max_steps']} steps, "
        f"lr {c['reference']['lr']}, fp32, batch 1 (experiment=prototype).",
        "",
        f"One fp32 decode + backward, batch 1, at {c['data']['size']} px: "
        f"{result['decode_backward_seconds']:.3f} s (median of 5).",
        "",
        *(
            [
                f"Every row ran {repeats} times, interleaved with the reference; times and "
                "speedups are medians, each speedup against the reference of its own round, with "
                "the range over rounds.",
                "",
            ]
            if repeats > 1
            else []
        ),
        markdown_table([{k: r.get(k, "—") for k in cols} for r in result["methods"]]),
        "",
    ]
    defaults = [r for r in result["methods"] if r["method"] == "default" and not r["skipped"]]
    refs = {r["vae"]: r for r in result["methods"] if r["method"] == "reference"}
    bounded_loops = {
        r["vae"]: r
        for r in result["methods"]
        if r["method"] == "prototype_eps1" and not r["skipped"]
    }
    if family or result.get("curve"):
        bound = c.get("spread_bound", 1.25)
        keys = (
            "vae",
            "gain_share_of_reference",
            "psnr_gain_mean",
            "speedup",
            "passes_mean",
            "spread_ratio_max",
            "channel_std_ratio_max",
            "hf_share_ratio",
        )
        rows = []
        for r in defaults:
            ref = refs[r["vae"]]
            row = {k: r[k] for k in keys} | {
                "reference_gain": ref["psnr_gain_mean"],
                "reference_spread": ref["spread_ratio_max"],
            }
            if "bounded_gain" in ref:  # the prototype's gain where it stays within the drift limit
                row |= {
                    "bounded_reference_gain": ref["bounded_gain"],
                    "bounded_at_passes": ref["bounded_passes"],
                    "share_of_bounded": r["psnr_gain_mean"] / ref["bounded_gain"],
                }
            loop = bounded_loops.get(r["vae"])
            if loop:  # the prototype's 50 steps under glo's eps: the other bounded reference
                row |= {
                    "prototype_eps1_gain": loop["psnr_gain_mean"],
                    "prototype_eps1_spread": loop["spread_ratio_max"],
                    "share_of_prototype_eps1": r["psnr_gain_mean"] / loop["psnr_gain_mean"],
                }
            rows.append(row)
        text += [
            "The default on each VAE: its gain as a share of the reference's on that VAE, its "
            "speed against the reference, and its latents' spread (largest std ratio to the "
            "encoder's along any direction of channel space, and along each channel) and "
            "high-frequency share against the encoder's. Where the reference spreads past "
            f"{bound:g}× (`reference_spread`), its gain under that bound "
            "(`bounded_reference_gain`: at the largest curve budget where its spread stays within "
            "it, `bounded_at_passes`; nan where even the first exceeds it), or its loop under "
            "glo's eps (`prototype_eps1`, where measured), is the one to read the share against:",
            "",
            markdown_table(rows),
            "",
        ]
    if result.get("curve"):
        keys = (
            "vae",
            "budget",
            "prototype_gain",
            "glo_gain",
            "glo_above",
            "glo_passes",
            "prototype_spread",
            "glo_spread",
        )
        text += [
            "Gain–passes curve: the PSNR gain (dB) after each budget of decoder passes, the "
            "prototype's from its own run, the default's with max_steps = budget - 1; `glo_above` "
            "where the default gains more:",
            "",
            markdown_table([{k: p[k] for k in keys} for p in result["curve"]]),
            "",
        ]
    first = result["methods"][0]["vae"]  # the speed target reads on the first VAE
    by_name = {r["method"]: r for r in result["methods"] if not r["skipped"] and r["vae"] == first}
    # the speed target reads against the bounded loop
    if "default" in by_name and "prototype_eps1" in by_name:
        d, b = by_name["default"], by_name["prototype_eps1"]
        text += [
            "The default against the prototype's loop under the same drift limit "
            f"(prototype_eps1): {d['images_per_second'] / b['images_per_second']:.2f}× its images "
            f"per second, {d['psnr_gain_mean'] - b['psnr_gain_mean']:+.3f} dB; against the "
            f"prototype itself (reference): {d['speedup']:.2f}×, {d['gain_vs_reference_db']:+.3f} "
            "dB.",
            "",
        ]
    skipped = [r for r in result["methods"] if r["skipped"]]
    if skipped:
        names = ", ".join(r["method"] for r in skipped)
        text += [
            f"Not measured on this machine: {names} "
            f"({skipped[0]['skipped'].removeprefix('not measured: ')}).",
            "",
        ]
    if result["memory"]:
        keys = ("method", "peak_memory_mb", "seconds_per_image", "overrides")
        text += [
            "Peak memory:",
            "",
            markdown_table([{k: r[k] for k in keys} for r in result["memory"]]),
            "",
        ]
    return "\n".join(text)
