"""Metrics against known values, the report files of a run, and one-line errors for damaged runs."""
import csv
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from glo import GloError
from glo.data.images import SampleDataset
from glo.evaluate import main as evaluate_main
from glo.latents import load_latents
from glo.layout import DRIFT
from glo.method.metrics import mae, ms_ssim, psnr, region_psnr, ssim
from glo.model.vae import FrozenVAE
from glo.report.evaluation import upscaling
from glo.report.grids import comparison_grid, error_map
from glo.report.render import describe, drift_rows, markdown_table, write_report
from glo.store.summary import summarize
from tests.conftest import FAST, run_glo
from tests.test_export import rows


def test_identical_images_score_perfectly():
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(2)) and torch.allclose(ms_ssim(x, x), torch.ones(2))
    assert torch.equal(mae(x, x), torch.zeros(2))


def test_known_gaussian_noise_gives_the_psnr_it_implies():
    torch.manual_seed(0)
    target = torch.zeros(4, 3, 128, 128)  # mid grey: the noise never reaches the clamp
    sigma = 0.02  # in [-1,1] units, i.e. 0.01 in [0,1] units -> 40 dB
    pred = target + sigma * torch.randn_like(target)
    assert psnr(pred, target) == pytest.approx(torch.full((4,), 40.0), abs=0.1)
    assert mae(pred, target) == pytest.approx(torch.full((4,), 0.01 * math.sqrt(2 / math.pi)), rel=0.02)
    assert (ssim(pred, target) < 1).all() and (ms_ssim(pred, target) < 1).all()


def test_ssim_and_ms_ssim_score_on_the_unit_range_with_the_scales_the_size_allows():
    """Flat images a and b (in [0, 1] units) have SSIM (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * range)^2: range
    1 here (range 2, the [-1, 1] span, would give 0.138, not 0.038). Values past [-1, 1] are clamped first, as a
    viewer sees them. A 64-px image has room for 3 MS-SSIM scales (each needs more than 10 * 2^k px)."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    from glo.method.metrics import MS_SSIM_BETAS

    a, b = torch.full((1, 3, 32, 32), -1.0), torch.full((1, 3, 32, 32), -0.9)  # 0 and 0.05 in [0, 1] units
    assert ssim(a, b).item() == pytest.approx(1e-4 / (0.05**2 + 1e-4), rel=1e-3)
    assert torch.isinf(psnr(torch.full((1, 3, 8, 8), 1.5), torch.ones(1, 3, 8, 8))).all()
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    three = multiscale_structural_similarity_index_measure(x, y, data_range=1.0, reduction="none",
                                                           betas=MS_SSIM_BETAS[:3])
    assert torch.allclose(ms_ssim(x * 2 - 1, y * 2 - 1), three)


def test_the_grid_shows_the_best_median_and_worst_image_best_first():
    from glo.report.evaluation import picks

    assert picks(np.array([0.5, 2.0, -1.0, 1.0, 0.1])) == [(1, "best"), (0, "median"), (2, "worst")]


def test_improved_counts_the_way_each_metric_improves(finished_run):
    """MAE and LPIPS improve downwards, PSNR and SSIM upwards: each fraction as the per-image table counts it."""
    with open(finished_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((finished_run / "summary.json").read_text())
    for m, better in (("mae", lambda r: float(r["mae_final"]) < float(r["mae_initial"])),
                      ("ssim", lambda r: float(r["ssim_final"]) > float(r["ssim_initial"]))):
        assert summary[f"{m}_improved_fraction"] == pytest.approx(np.mean([better(r) for r in rows]))
    assert summary["mae_improved_fraction"] > 0  # a run that gains PSNR lowers MAE: the count must see it


def test_report_files_of_a_run(finished_run):
    ids = list(np.load(finished_run / "latents.npz")["ids"])
    with open(finished_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ids
    assert all(float(r["psnr_gain"]) > 0 for r in rows)
    assert {"ms_ssim_final", "mae_initial", "ssim_gain"} <= rows[0].keys()
    summary = json.loads((finished_run / "summary.json").read_text())
    for m in ("psnr", "ssim", "ms_ssim", "mae"):
        assert {f"{m}_initial_mean", f"{m}_final_median", f"{m}_improved_fraction"} <= summary.keys()
    assert summary["psnr_improved_fraction"] == 1.0 and summary["mae_final_mean"] < summary["mae_initial_mean"]
    report = (finished_run / "report.md").read_text()
    for png in ("loss_curves", "psnr_scatter", "psnr_gain", "steps", "grids", "gain_vs_drift"):
        img = np.asarray(Image.open(finished_run / f"{png}.png").convert("RGB"))
        assert img.shape[0] > 200 and img.shape[1] > 200
        assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 20, f"{png}.png looks blank"
        assert f"({png}.png)" in report
    assert '"lr": 0.1' in report and "LPIPS" in report  # the config, and why LPIPS was skipped
    metadata = json.loads((finished_run / "metadata.json").read_text())  # the machine that made the figures
    assert f"Measured on {describe(metadata['machine'])}; decoder precision fp32 (forced by precision=fp32" in report
    run_table = report.split("## Run")[1].split("\n\n")[1].splitlines()
    assert run_table[0].split(" | ")[2] == "passes_mean" and run_table[2].split(" | ")[2] == f"{summary['passes_mean']:g}"
    assert run_table[2].endswith("| fp32 |") and f"{summary['passes_mean']:.1f} decoder passes" in report
    drift = report[report.index("## Drift from the encoder's latents"):]
    std0, std1 = summary["channel_std_initial"][0], summary["channel_std_final"][0]
    assert f"| channel 0 mean / std | {summary['channel_mean_initial'][0]:.3f} / {std0:.3f} |" in drift
    assert f"std x{std1 / std0:.2f}" in drift and f"| {summary['drift_distance_mean']:.4f} |" in drift
    table = [line for line in drift.splitlines() if line.startswith("|")]
    columns = {len(re.findall(r"(?<!\\)\|", line)) for line in table}  # unescaped pipes per line
    assert len(table) == 10 and columns == {5}, table  # norms like ||z|| do not split a row into more columns
    assert f"| largest std ratio along any direction of channel space | 1 | {summary['spread_ratio_max']:.3f} |" in drift


def test_a_run_dir_without_or_with_a_truncated_latents_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate_main([str(tmp_path)])
    assert e.value.code == 1 and "latents.npz: no such file" in capsys.readouterr().err
    (tmp_path / "latents.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SystemExit):
        evaluate_main([str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "latents.npz: not a readable latents file" in err[0]


def test_tensorboard_gets_losses_report_images_and_hparams(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from glo.run import HPARAM_METRICS

    scalars, images, hparams = set(), set(), set()
    for f in finished_run.glob("events.out.tfevents.*"):
        ea = EventAccumulator(str(f))
        ea.Reload()
        scalars |= set(ea.Tags()["scalars"])
        images |= set(ea.Tags()["images"])
        try:
            hparams |= set(ea.PluginTagToContent("hparams"))
        except KeyError:
            pass
    assert {"loss/batch_mean", "image/psnr_gain"} | {f"hparams/{k}" for k in HPARAM_METRICS} <= scalars
    assert {"report/grids", "report/loss_curves", "grid/input|initial|optimized|error"} <= images
    assert "_hparams_/session_start_info" in hparams


def test_a_tensorboard_grid_puts_the_first_rows_of_each_panel_side_by_side_in_0_1():
    x = torch.linspace(-1, 1, 6 * 3 * 2 * 2).view(6, 3, 2, 2)
    colour_errors = torch.tensor([[0.3, -0.15, 0], [0.9, 0.9, 0.9], [0, 0, 0]] + [[0.25, 0.25, 0.25]] * 3)
    pred = x + colour_errors[:, :, None, None]
    err = error_map(pred, x)
    expected = torch.tensor([-0.4, 1, -1, 0, 0, 0])  # 4 * mean |error| - 1, cut at 1 (white)
    assert err.shape == x.shape and torch.allclose(err, expected.view(6, 1, 1, 1).expand_as(x), atol=1e-6)
    grid = comparison_grid([x * 2, pred, err, torch.full_like(x, 3.0)])  # x * 2 and 3 leave [-1,1]: clamped
    assert grid.shape == (3, 4 * 2, 4 * 2)                                 # 4 rows by default, 4 panels
    assert torch.allclose(grid[:, 0:2, 0:2], ((x[0] * 2).clamp(-1, 1) + 1) / 2) and grid[:, 0:2, 0:2].min() == 0
    assert torch.allclose(grid[:, 2:4, 2:4], (pred[1] + 1) / 2)                    # row 1, panel 1
    assert torch.allclose(grid[:, 6:8, 4:6], torch.full((3, 2, 2), 0.5), atol=1e-6)  # row 3's error map
    assert torch.equal(grid[:, :, 6:8], torch.ones(3, 8, 2))


def test_known_psnr_is_the_noise_on_the_known_pixels_whatever_the_hole_holds():
    torch.manual_seed(0)
    target = torch.zeros(2, 3, 64, 64)
    known = torch.ones(2, 1, 64, 64)
    known[:, :, 16:48, 16:48] = 0
    sign = torch.randint(0, 2, target.shape).float() * 2 - 1
    pred = target + 0.02 * sign  # exactly 0.01 off in [0,1] units on every pixel -> 40 dB
    pred = torch.where(known > 0, pred, torch.rand_like(pred) * 2 - 1)  # garbage in the hole
    assert region_psnr(pred, target, known) == pytest.approx(torch.full((2,), 40.0), abs=1e-3)


def test_an_all_hole_mask_has_no_known_psnr_and_is_left_out_of_the_means():
    """No known pixel: NaN, not inf, and the summary's means are over the images that have known pixels."""
    pred, target = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.02)
    known = torch.ones(2, 1, 8, 8)
    known[1] = 0
    scores = region_psnr(pred, target, known)
    assert scores[0] == pytest.approx(40.0, abs=1e-3) and torch.isnan(scores[1])
    s = summarize(rows(3, psnr_known_initial=np.array([10.0, np.nan, 14]), psnr_known_final=np.array([11.0, np.nan, 13])))
    assert s["psnr_known_initial_mean"] == 12.0 and s["psnr_known_final_mean"] == 12.0
    assert s["known_images_improved"] == 1 and s["psnr_known_improved_fraction"] == 0.5
    assert s["images_without_known_pixels"] == 1
    alone = summarize(rows(1, psnr_known_initial=np.array([np.nan]), psnr_known_final=np.array([np.nan])))
    assert math.isnan(alone["psnr_known_final_mean"]) and alone["images_without_known_pixels"] == 1


def test_a_masked_runs_report_gives_the_masked_latents_their_own_drift_table_and_known_psnr(tmp_path):
    rng = np.random.default_rng(0)
    drift = {f"{p}{k}": rng.random((3, 4, 4) if "moment" in k else (3, 4) if "channel" in k else 3) + 0.1 for p in ("", "masked_") for k in DRIFT}
    known = {"psnr_known_initial": np.array([10.0, 12, 14]), "psnr_known_final": np.array([11.0, 12, 17])}
    s = summarize(rows(3, **drift, **known))
    report = write_report(tmp_path, s, {}, {}, []).read_text()
    assert "Measured on" not in report and "\n.\n" not in report  # a run that recorded no machine claims none
    # a run from before passes were counted: no passes claimed; drift measures are not quality rows
    assert "; 3 images improved; 1.0 steps on average.\n" in report
    assert "| 3 | 1 | nan | 0 | 0 | 3 | 1 | — |\n\n## Drift from the encoder's latents\n\nHow far the optimized latents " \
           "lie from what the encoder produces, the distribution a diffusion UNet was trained on (glo.method.drift; scaled SD " \
           "units).\n\n| measure |" in report
    assert "| hf_share" not in report and "| reencode" not in report
    assert "## Notes" not in report and "```json\n{}\n```" in report and "|\n\n## Plots" in report
    assert "\n### The masked-image latents (inpainting conditioning)\n\n| measure |" in report
    full, masked = report.split("### The masked-image latents")
    assert f"| {s['drift_distance_mean']:.4f} |" in full and f"| {s['masked_drift_distance_mean']:.4f} |" in masked
    assert f"| {s['masked_hf_share_final_mean']:.4f} |" in masked.split("## ")[0]
    assert "| psnr_known | 12 | 13.33 | 12 | 12 | 0.6667 |" in full  # medians and fraction improved, not nan


def test_markdown_tables_escape_bars_and_round_floats():
    assert markdown_table([{"a|b": "||z||", "x": 0.123456}, {"a|b": 3, "x": 2.0}]) == (
        "| a\\|b | x |\n|---|---|\n| \\|\\|z\\|\\| | 0.1235 |\n| 3 | 2 |")


def test_drift_rows_are_the_summary_by_hand():
    s = {"channel_mean_initial": [0.5, -1], "channel_std_initial": [0.5, 0], "channel_mean_final": [0.25, 1],
         "channel_std_final": [0.75, 1], "hf_share_initial_mean": 0.2, "hf_share_final_mean": 0.3,
         "reencode_error_initial_mean": 0.0, "reencode_error_final_mean": 0.5, "drift_distance_mean": 0.125}
    assert drift_rows({f"masked_{k}": v for k, v in s.items()}, "masked_") == drift_rows(s) == [
        {"measure": "channel 0 mean / std", "encoder": "0.500 / 0.500", "optimized": "0.250 / 0.750", "ratio": "std x1.50"},
        {"measure": "channel 1 mean / std", "encoder": "-1.000 / 0.000", "optimized": "1.000 / 1.000", "ratio": "—"},
        {"measure": "high-frequency power share", "encoder": "0.2000", "optimized": "0.3000", "ratio": "x1.50"},
        {"measure": "re-encode error ||E(D(z)) - z|| / ||z||", "encoder": "0.0000", "optimized": "0.5000", "ratio": "—"},
        {"measure": "distance ||z - z0|| / ||z0||", "encoder": "0", "optimized": "0.1250", "ratio": "—"}]


def test_metrics_of_an_image_changed_since_its_latent_was_made_are_refused(finished_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = (run / "metrics.csv").read_bytes()
    real = SampleDataset.digests
    monkeypatch.setattr(SampleDataset, "digests", lambda self: {**real(self), "coffee": "0" * 64})  # as if edited
    with pytest.raises(SystemExit):
        evaluate_main([str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image 'coffee' has changed since its latent was made (1 in all)" in err[0], err
    assert (run / "metrics.csv").read_bytes() == before


def test_a_report_reads_each_rows_scores_and_decodes_only_the_grid_images(tmp_path, monkeypatch):
    """glo.method.fit scored every image on the decodes it made: the report decodes again only its best, median and worst
    image (for the grids), not the whole dataset, and its means are the rows' own."""
    run = tmp_path / "run"
    p = run_glo(*FAST, "data.limit=6", "report=false", "logger=none", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-2000:]
    decoded = []
    real = FrozenVAE.decode
    monkeypatch.setattr(FrozenVAE, "decode", lambda self, z: decoded.append(len(z)) or real(self, z))
    evaluate_main([str(run)])
    arrays = load_latents(run / "latents.npz")
    gain = arrays["psnr_final"] - arrays["psnr_initial"]
    assert sum(decoded) == 2 * len({int(gain.argmax()), int(gain.argmin()), int(np.argsort(gain)[len(gain) // 2])})
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ms_ssim_final_mean"] == pytest.approx(arrays["ms_ssim_final"].mean())
    assert summary["mae_initial_mean"] == pytest.approx(arrays["mae_initial"].mean())


def test_rows_without_a_metric_are_scored_by_decoding_and_agree_with_the_rows_that_have_it(finished_run, tmp_path):
    """A run from a glo whose rows had no ms_ssim or mae still gets its report, by decoding every image; the scores
    equal those glo.method.fit stored (so the stored ones are the same metric on the same decodes)."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    arrays = load_latents(run / "latents.npz")
    old = {k: v for k, v in arrays.items() if not k.startswith(("ms_ssim_", "mae_"))}
    np.savez(run / "latents.npz", **old)
    evaluate_main([str(run)])
    with open(finished_run / "metrics.csv") as f, open(run / "metrics.csv") as g:
        stored, rescored = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [r["id"] for r in rescored] == [r["id"] for r in stored] and rescored[0].keys() == stored[0].keys()
    for a, b in zip(stored, rescored):
        for k in ("ms_ssim_initial", "ms_ssim_final", "mae_initial", "mae_final"):
            assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-4, abs=1e-6), (k, a["id"])


def test_a_run_resumed_on_another_machine_names_both_in_its_report(tmp_path):
    """Its images/s mixes two machines' times: the report says so, as every figure names its machine."""
    a = {"cpu": "CPU A", "cpu_capability": "AVX2", "cpu_native_bf16": False, "cpus": 2, "torch_threads": 2}
    b = {**a, "cpu": "CPU B", "cpu_capability": "AVX512", "cpu_native_bf16": True}
    sessions = [{"machine": a}, {"machine": b}, {"machine": a}]
    metadata = {"machine": a, "sessions": sessions, "precision": {"used": "fp32", "reason": "forced by precision=fp32"}}
    report = write_report(tmp_path, summarize(rows(3)), {}, metadata, []).read_text()
    assert f"Measured on {describe(a)}; and on {describe(b)}; decoder precision fp32 (forced by precision=fp32)." in report
    assert describe(a) == "CPU A (AVX2, no native bf16), 2 CPUs, 2 torch threads"
    assert describe(b) == "CPU B (AVX512, native bf16), 2 CPUs, 2 torch threads"



def test_a_plot_is_a_png_at_110_dpi(tmp_path):
    from matplotlib.figure import Figure

    from glo.report.render import save_figure

    path = save_figure(Figure(figsize=(2, 1)), tmp_path / "plot.png")
    with Image.open(path) as img:
        assert (img.format, img.size) == ("PNG", (220, 110))
    assert list(tmp_path.iterdir()) == [path]  # and no temporary file beside it


def test_a_plot_cut_off_while_written_leaves_no_file(tmp_path, monkeypatch):
    """Plots are written under a temporary name and renamed, like every file of a run: a full disk mid-write leaves
    neither a truncated PNG nor the temporary file."""
    from matplotlib.figure import Figure

    from glo.report.render import save_figure

    def half_then_fail(self, f, **kwargs):
        f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    with pytest.raises(OSError):
        save_figure(Figure(), tmp_path / "plot.png")
    assert list(tmp_path.iterdir()) == []


def test_report_md_in_full_for_a_known_run(tmp_path):
    """Every number of the headline, the tables, the machine line and the config, against text written by hand."""
    s = summarize(rows(4, psnr_final=np.array([1.0, 2, 3, 4]), passes=np.full(4, 7.5), steps=np.full(4, 7.0)))
    s.update({"ms_ssim_initial_mean": 0.5, "ms_ssim_final_mean": 0.75, "ms_ssim_initial_median": 0.5,
              "ms_ssim_final_median": 0.8, "ms_ssim_improved_fraction": 0.75})
    gpu = {"cpu": "CPU A", "cpu_capability": "AVX2", "cpu_native_bf16": False, "cpus": 2, "torch_threads": 1,
           "cuda": "Tesla T4"}
    metadata = {"machine": gpu, "precision": {"used": "fp32", "reason": "auto: no native bf16"}, "config": {"lr": 0.25}}
    report = write_report(tmp_path, s, {"grids": tmp_path / "grids.png"}, metadata, ["LPIPS skipped: x"]).read_text()
    assert (tmp_path / "report.md").read_text() == report == f"""# glo run report: {tmp_path.name}

4 images; mean PSNR 0.00 → 2.50 dB (+2.50 dB); 4 images improved; 7.5 decoder passes, 7.0 steps on average.

## Quality

| metric | initial mean | optimized mean | initial median | optimized median | fraction improved |
|---|---|---|---|---|---|
| psnr | 0 | 2.5 | nan | nan | nan |
| ssim | 0 | 1 | nan | nan | nan |
| ms_ssim | 0.5 | 0.75 | 0.5 | 0.8 | 0.75 |

## Run

| num_images | steps_mean | passes_mean | converged | nonfinite | seconds_total | images_per_second | precision |
|---|---|---|---|---|---|---|---|
| 4 | 7 | 7.5 | 0 | 0 | 4 | 1 | fp32 |

Measured on CPU A (AVX2, no native bf16), 2 CPUs, 1 torch threads, GPU Tesla T4; decoder precision fp32 (auto: no native bf16).

## Notes

- LPIPS skipped: x

## Plots

![grids](grids.png)

## Config

```json
{{
  "lr": 0.25
}}
```
"""


def _job(sweep, name, gain, machine, overrides):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "summary.json").write_text(json.dumps({
        "psnr_gain_mean": gain, "psnr_final_mean": 20 + gain, "ssim_initial_mean": 0.5, "ssim_final_mean": 0.75,
        "steps_mean": 7.0, "passes_mean": 7.5, "images_per_second": 0.25}))
    (job / "metadata.json").write_text(json.dumps({"machine": machine, "precision": {"used": "bf16"}}))


def test_compare_ranks_jobs_and_names_the_machine_their_speeds_were_measured_on(tmp_path):
    from glo.compare import compare

    a = {"cpu": "CPU A", "cpu_capability": "AVX2", "cpu_native_bf16": False, "cpus": 2, "torch_threads": 2}
    _job(tmp_path, "0", 1.0, a, ["lr=0.05"])
    _job(tmp_path, "1", 2.0, a, ["lr=0.1"])
    rows = compare(tmp_path)
    assert [r["job"] for r in rows] == ["1", "0"] and rows[0]["passes_mean"] == 7.5 and rows[0]["precision"] == "bf16"
    md = (tmp_path / "compare.md").read_text()
    assert md.splitlines()[0] == ("| job | overrides | psnr_gain_mean | psnr_final_mean | ssim_gain_mean | steps_mean "
                                  "| passes_mean | images_per_second | precision |")
    assert md.splitlines()[2] == "| 1 | lr=0.1 | 2 | 22 | 0.25 | 7 | 7.5 | 0.25 | bf16 |"
    assert md.endswith(f"\n\nMeasured on {describe(a)}.\n")
    with open(tmp_path / "compare.csv") as f:
        assert [r["machine"] for r in csv.DictReader(f)] == [describe(a)] * 2
    # a sweep whose jobs ran on two machines (a cluster): their images/s are not comparable, each row says where
    _job(tmp_path, "2", 3.0, {**a, "cpu": "CPU B"}, ["lr=0.2"])
    md = (tmp_path / "compare.md").read_text() if compare(tmp_path) else ""
    assert md.splitlines()[0].endswith("| precision | machine |") and "Measured on" not in md
    assert md.splitlines()[2].endswith(f"| bf16 | {describe({**a, 'cpu': 'CPU B'})} |")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "2", "compare.csv", "compare.md"]  # no temp files
    # jobs whose metadata names no machine (an older glo's): no machine is claimed
    old = tmp_path / "old"
    _job(old, "0", 1.0, a, ["lr=0.05"])
    (old / "0" / "metadata.json").write_text("{}")
    compare(old)
    assert "Measured on" not in (old / "compare.md").read_text() and "machine" not in (old / "compare.md").read_text()


def test_a_file_name_that_is_not_utf8_is_reported_not_a_crash_after_the_work(tmp_path):
    """Python holds such a name's bytes as surrogates, which UTF-8 files and fonts refuse: shown escaped."""
    folder = os.fsencode(tmp_path / "imgs")
    os.makedirs(folder)
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(folder + b"/caf\xe9.png")
    p = run_glo(*FAST, "data=folder", f"data.path={tmp_path / 'imgs'}", "logger=none", f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode == 0, p.stderr[-2000:]
    rows = (tmp_path / "run" / "metrics.csv").read_bytes().decode("utf-8").splitlines()
    assert rows[1].startswith("caf\\udce9,") and (tmp_path / "run" / "grids.png").is_file()


def test_compare_names_the_jobs_it_leaves_out_instead_of_a_traceback(tmp_path):
    """A killed job (no summary.json), a damaged one and one from another tool: each named, the rest ranked."""
    from glo.compare import compare

    a = {"cpu": "CPU A", "cpu_capability": "AVX2", "cpu_native_bf16": False, "cpus": 2, "torch_threads": 2}
    _job(tmp_path, "0", 1.0, a, ["lr=0.05"])
    for name, text in (("1", None), ("2", '{"psnr_gain_mean": 1'), ("3", '{"psnr_gain_mean": 1}')):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        if text is not None:
            (tmp_path / name / "summary.json").write_text(text)
    assert [r["job"] for r in compare(tmp_path)] == ["0"]
    left = (tmp_path / "compare.md").read_text().splitlines()[-1]
    assert left.startswith("Left out: 1 (not finished: no summary.json), 2 (summary.json unreadable: ")
    assert left.endswith(", 3 (summary.json unreadable: no 'psnr_final_mean').")
    shutil.rmtree(tmp_path / "0")
    with pytest.raises(GloError, match=r"no finished jobs .*; left out: 1 \(not finished"):
        compare(tmp_path)


def test_images_smaller_than_the_run_size_are_counted_and_named_as_upscaled(finished_run, tmp_path):
    """BSDS500 at 512 px enlarges every 321 px side: report.md and summary.json say how many images were upscaled
    and from what, since interpolated pictures are not photos of that size. A run without any says nothing."""
    assert json.loads((finished_run / "summary.json").read_text())["images_upscaled"] == 0
    assert "upscaled" not in (finished_run / "report.md").read_text()
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    arrays = load_latents(run / "latents.npz")
    size = json.loads((run / "metadata.json").read_text())["image_size"]
    arrays["original_size"] = np.array([[size - 16, 300], [size, size], [500, size - 8]], dtype=np.int64)
    np.savez(run / "latents.npz", **arrays)
    evaluate_main([str(run)])
    assert json.loads((run / "summary.json").read_text())["images_upscaled"] == 2
    assert (f"- 2 of 3 images were upscaled to {size} px from a shorter side of {size - 16}–{size - 8} px "
            "(`original_size`)") in (run / "report.md").read_text()


def test_upscaling_counts_the_shorter_side_only():
    sizes = {"original_size": np.array([[321, 481], [481, 321], [512, 768], [600, 400]])}
    assert upscaling(sizes, 512)[0] == 3
    assert upscaling(sizes, 512)[1].startswith("3 of 4 images were upscaled to 512 px from a shorter side of 321–400 px")
    assert upscaling(sizes, 321) is None and upscaling(sizes, None) is None
    assert upscaling({"original_size": sizes["original_size"][:2]}, 512)[1].startswith("2 of 2 images were upscaled "
                                                                                      "to 512 px from a shorter side of 321 px (")
