"""glo.bench end to end on two generated images and the tiny VAE: both files, every method row."""
import json

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from glo import GloError
from glo.app.config import built
from glo.bench import median_row
from glo.method.settings import Settings
from glo.model.hardware import Speed, cpu_native_bf16
from glo.report.render import describe
from tests.conftest import ROOT, compose_config, run_config, run_glo

ONLY = ["default", "default_batch8", "default_eps2", "prototype_eps1", "bf16", "gradfree"]  # each code path once


def smooth_images(folder, n):
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(n):
        smooth = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
        Image.fromarray(smooth).save(folder / f"img{i}.png")
    return folder


@pytest.mark.slow
def test_bench_writes_json_and_markdown_for_the_methods_asked(tmp_path):
    out, figures = tmp_path / "bench", tmp_path / "figures.md"
    figures.write_text("# Figures\n\n<!-- glo.bench tiny_random -->\nold\n<!-- /glo.bench tiny_random -->\n\n"
                       "<!-- glo.bench_load -->\nkept\n<!-- /glo.bench_load -->\n")
    p = run_glo("vae=tiny_random", f"data.path={smooth_images(tmp_path / 'images', 2)}", "data.limit=2", "data.size=32",
                'reference=["experiment=prototype","max_steps=5"]', f"only=[{','.join(ONLY)}]", "memory.enabled=true", "memory.vae=tiny_random", "memory.size=64",
                f"hydra.run.dir={out}", f"publish={figures}", module="glo.bench")
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert [r["method"] for r in result["methods"]] == ["reference", *ONLY]
    native = cpu_native_bf16()
    for r in result["methods"]:
        if r["skipped"]:  # reduced precision is only measured where the CPU runs it natively
            assert not native and r["precision"] in ("bf16", "fp16") and "no native bf16" in r["skipped"]
            continue
        assert r["images"] == 2 and r["images_per_second"] > 0 and r["peak_memory_mb"] > 0
        assert np.isfinite(r["psnr_gain_mean"]) and np.isfinite(r["speedup"])
        assert r["passes_mean"] > 0 and r["precision"] in ("fp32", "bf16", "fp16")
        assert r["spread_ratio_max"] >= r["channel_std_ratio_max"] * (1 - 1e-4)  # any direction, channels among them
    by_name = {r["method"]: r for r in result["methods"]}
    assert by_name["default_eps2"]["drift_distance"] < by_name["default"]["drift_distance"]
    assert by_name["reference"]["psnr_gain_mean"] > 0 and by_name["reference"]["passes_mean"] == 5
    assert by_name["bf16"]["skipped"] or by_name["bf16"]["psnr_gain_mean"] > 0
    assert by_name["reference"]["speedup"] == 1.0 and result["decode_backward_seconds"] > 0
    assert [r["method"] for r in result["memory"]] == ["plain", "checkpointing", "checkpointing_tiled"]
    md = (out / "bench.md").read_text()
    assert all(f"| {name} |" in md for name in by_name) and "Peak memory" in md
    assert describe(result["machine"]) in md.splitlines()[2]  # the CPU and its capability head every table
    d, b = by_name["default"], by_name["prototype_eps1"]  # the speed target, read against the bounded loop
    assert (f"(prototype_eps1): {d['images_per_second'] / b['images_per_second']:.2f}× its images per second, "
            f"{d['psnr_gain_mean'] - b['psnr_gain_mean']:+.3f} dB; against the prototype itself (reference): "
            f"{d['speedup']:.2f}×") in md
    # docs/figures.md: this VAE's section replaced, under the command and the machine; the others kept
    text = figures.read_text()
    section = text[text.index("<!-- glo.bench tiny_random -->"):text.index("<!-- /glo.bench tiny_random -->")]
    header = section.splitlines()[1]
    assert header.startswith("`python -m glo.bench vae=tiny_random ") and "publish=" not in header
    assert str(tmp_path) not in header and " data.path=images " in header  # never a directory of this machine
    assert header.endswith(f"{describe(result['machine'])}, {result['date'][:10]}") and "old" not in section
    assert "| default |" in section and "<!-- glo.bench_load -->\nkept\n" in text


@pytest.mark.slow
def test_repeated_rows_report_median_speedups_against_their_own_rounds_reference(tmp_path):
    out = tmp_path / "bench"
    p = run_glo("vae=tiny_random", f"data.path={smooth_images(tmp_path / 'images', 1)}", "data.limit=1", "data.size=32",
                'reference=["experiment=prototype","max_steps=3"]', "only=[default]", "repeats=2", f"hydra.run.dir={out}",
                module="glo.bench")
    assert p.returncode == 0, p.stderr[-3000:]
    ref, default = json.loads((out / "bench.json").read_text())["methods"]
    assert ref["speedup_runs"] == [1.0, 1.0] and len(default["speedup_runs"]) == 2
    assert default["speedup"] == float(np.median(default["speedup_runs"]))
    assert len(set(default["psnr_gain_mean_runs"])) == 1  # same images, same computation: only time varies
    md = (out / "bench.md").read_text()
    assert "Every row ran 2 times" in md and f"| {min(default['speedup_runs']):.2f}–" in md


def test_median_row_takes_the_median_time_and_keeps_the_range():
    runs = [{"method": "m", "skipped": "", "images_per_second": i, "seconds_per_image": 1 / i, "speedup": s,
             "psnr_gain_mean": 2.0} for i, s in ((1.0, 5.0), (3.0, 7.0), (2.0, 6.5))]
    row = median_row(runs)
    assert (row["images_per_second"], row["seconds_per_image"], row["speedup"]) == (2.0, 0.5, 6.5)
    assert row["speedup_range"] == "5.00–7.00" and row["psnr_gain_mean_runs"] == [2.0, 2.0, 2.0]
    assert median_row(runs[:1]) == runs[0] and median_row([{"skipped": "no bf16"}] * 2) == {"skipped": "no bf16"}


@pytest.mark.parametrize("name", OmegaConf.load(ROOT / "conf/bench.yaml").methods)
def test_every_bench_method_composes_into_valid_settings(name):
    """What the end-to-end test above does not run: each row's overrides still name real, valid settings."""
    cfg = run_config("vae=tiny_random", *OmegaConf.load(ROOT / "conf/bench.yaml").methods[name])
    settings, speed = built(Settings, cfg), built(Speed, cfg)
    assert settings.max_steps >= 1 and speed.tile_size >= 0


def test_a_mistyped_row_stops_the_bench_before_any_row_runs(monkeypatch, tmp_path):
    """Rows run in order, the reference first (minutes each): a typo in the last row must not cost them all."""
    import glo.bench

    monkeypatch.setattr(glo.bench, "run_isolated", lambda *a, **k: pytest.fail("a row ran"))
    cfg = compose_config("bench", "vae=tiny_random", "only=[default,mine]", '+methods.mine=["max_step=5"]')
    with pytest.raises(GloError, match=r"mine \['max_step=5'\]: max_step: glo has no setting max_step"):
        glo.bench.bench(cfg, tmp_path)
    with pytest.raises(GloError, match="max_steps=0: must be >= 1"):  # a bad value, as glo.run says it
        glo.bench.bench(OmegaConf.merge(cfg, {"methods": {"mine": ["max_steps=0"]}}), tmp_path)


@pytest.mark.slow
def test_bench_load_exports_every_image_once_in_both_formats(tmp_path):
    p = run_glo("--counts", "3", "12", "--size", "16", "--batch-size", "5", "--out", str(tmp_path),
                "--publish", str(tmp_path / "figures.md"), module="glo.bench_load")
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / "bench_load.json").read_text())
    assert [(r["images"], r["format"]) for r in result["rows"]] == [(3, "npz"), (3, "hdf5"), (12, "npz"), (12, "hdf5")]
    assert all(r["exported"] == r["unique"] == r["images"] and r["peak_rss_mb"] > 50 for r in result["rows"])
    assert set(result["peak_growth_largest_over_smallest"]) == {"npz", "hdf5"}
    section = (tmp_path / "figures.md").read_text().split("<!-- glo.bench_load -->\n")[1]
    assert section.startswith("`python -m glo.bench_load --counts 3 12 --size 16 --batch-size 5` — ")
    assert "| 12 | hdf5 |" in section and "Peak RSS, largest over smallest run: npz " in section


@pytest.mark.parametrize("channels", [4, 16])
def test_the_unit_cost_is_timed_on_the_vaes_own_latent_channels(channels):
    """SD 1/2 and SDXL latents have 4 channels, SD3's and Flux's 16: the bench times any of them."""
    from glo.bench import decode_backward_seconds

    assert decode_backward_seconds(["vae=tiny_random", f"vae.config.latent_channels={channels}"], 16, repeats=1) > 0


@pytest.mark.slow
def test_a_family_bench_measures_each_vae_against_its_own_reference(tmp_path):
    out = tmp_path / "bench"
    p = run_glo(f"data.path={smooth_images(tmp_path / 'images', 2)}", "data.limit=2", "data.size=32",
                "family=[tiny_random,standin_half]", 'reference=["experiment=prototype","max_steps=5"]',
                "only=[default]", f"hydra.run.dir={out}", module="glo.bench")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((out / "bench.json").read_text())["methods"]
    assert [(r["vae"], r["method"]) for r in rows] == [(v, m) for v in ("tiny_random", "standin_half")
                                                       for m in ("reference", "default")]
    for ref, default in (rows[:2], rows[2:]):  # each VAE's default reads against that VAE's reference
        assert ref["speedup"] == 1.0 and default["speedup"] == pytest.approx(
            default["images_per_second"] / ref["images_per_second"])
        assert default["gain_share_of_reference"] == pytest.approx(default["psnr_gain_mean"] / ref["psnr_gain_mean"])
        assert default["hf_share_ratio"] == pytest.approx(default["hf_share"] / default["hf_share_encoder"])
    assert rows[0]["psnr_gain_mean"] != rows[2]["psnr_gain_mean"]  # two VAEs, not one measured twice
    md = (out / "bench.md").read_text()
    family = md[md.index("The default on each VAE"):]
    assert f"| tiny_random | {rows[1]['gain_share_of_reference']:.4g} |" in family
    assert f"| standin_half | {rows[3]['gain_share_of_reference']:.4g} |" in family
