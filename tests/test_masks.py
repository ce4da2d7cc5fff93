"""Inpainting: mask sources, the known-only loss, the latent-resolution mask, the export and glo.roundtrip."""
from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from glo import GloError
from glo.data.masks import FolderMasks, RandomMasks
from glo.latents import LatentDataset, load_latents
from glo.layout import COLUMNS, MASKED
from glo.method.engine import optimize
from glo.method.fit import latent_mask
from glo.method.losses import PixelLoss
from glo.method.metrics import psnr
from tests.conftest import FAST, VAE_FP32_ATOL, photos, run_glo, settings

IDS = ["astronaut", "coffee", "chelsea", "0001", "a/b"]


@pytest.mark.parametrize("kind", RandomMasks.KINDS)
def test_random_masks_are_seeded_binary_and_cover_the_configured_range(kind):
    masks = RandomMasks(kind, (0.15, 0.35), seed=3, known_only=False)
    first = [masks(i, (100, 100), 64) for i in IDS]
    again = [RandomMasks(kind, (0.15, 0.35), seed=3, known_only=False)(i, (100, 100), 64) for i in IDS]
    other_seed = [RandomMasks(kind, (0.15, 0.35), seed=4, known_only=False)(i, (100, 100), 64) for i in IDS]
    for m, m2, m3 in zip(first, again, other_seed):
        assert m.shape == (64, 64) and m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
        assert 0.15 <= m.mean() <= 0.35, m.mean()
        np.testing.assert_array_equal(m, m2)
        assert not np.array_equal(m, m3)
    assert not np.array_equal(first[0], first[1])  # each id its own mask


@pytest.mark.parametrize("loss", [PixelLoss("l1", 1.0, 0.0), PixelLoss("l2", 0.0, 1.0),
                                  PixelLoss("l1_l2", 0.5, 0.5)])
def test_known_only_loss_ignores_the_hole_exactly(loss, tiny_vae):
    x = photos(2)
    hole = torch.from_numpy(np.stack([RandomMasks("boxes", (0.2, 0.4), seed=0, known_only=False)(i, (64, 64), 64) for i in "ab"]))[:, None]
    known = 1 - hole
    z = tiny_vae.encode(x).requires_grad_(True)
    pred = tiny_vae.decode(z)
    scribbled = torch.where(hole > 0, torch.rand_like(x) * 100, x)  # the hole of the target holds anything

    def value_and_grad(target):
        z.grad = None
        value = loss(pred, target, known)
        value.sum().backward(retain_graph=True)
        return value.detach(), z.grad.clone()

    v1, g1 = value_and_grad(x)
    v2, g2 = value_and_grad(scribbled)
    assert torch.equal(v1, v2) and torch.equal(g1, g2)
    assert g1.abs().sum() > 0
    v3, _ = value_and_grad(torch.where(hole > 0, x, x + 0.5))  # a change in the known region does count
    assert (v3 != v1).all()


def test_latent_mask_marks_every_cell_the_hole_touches():
    rng = np.random.default_rng(0)
    hole = torch.zeros(2, 1, 64, 64)
    for b in range(2):
        for y, x in rng.integers(0, 64, (12, 2)):
            hole[b, 0, y, x] = 1  # single pixels: one touched pixel must mark its whole cell
    cells = latent_mask(hole)
    assert cells.shape == (2, 1, 8, 8)
    expected = hole.reshape(2, 1, 8, 8, 8, 8).amax(dim=(3, 5))
    assert torch.equal(cells, expected) and cells.sum() > 0


def test_masked_engine_run_improves_the_known_region(tiny_vae):
    x = photos(2)
    known = 1 - torch.from_numpy(np.stack([RandomMasks("strokes", (0.2, 0.3), seed=0, known_only=False)(i, (64, 64), 64) for i in "ab"]))[:, None]
    masked = x * known
    z0 = tiny_vae.encode(masked)
    r = optimize(tiny_vae.decode, z0, masked, PixelLoss("l2", 0.0, 1.0), settings(lr=0.1, max_steps=15, rel_tol=0.0, window=5),
                 weight=known)
    assert (r.final_loss < r.initial_loss).all()


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("masked") / "run"
    p = run_glo(*FAST, "mask=boxes", "mask.known_only=true", "report=false", f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_masked_run_exports_the_inpainting_conditioning(masked_run):
    a = load_latents(masked_run / "latents.npz")
    n = len(a["ids"])
    assert set(a) == set(COLUMNS) | set(MASKED) - {"mask_sha256"}  # boxes are drawn, not files
    assert a["masks"].shape == (n, 64, 64) and a["masks"].dtype == bool
    np.testing.assert_array_equal(a["latent_masks"], latent_mask(torch.from_numpy(a["masks"][:, None].astype(np.float32))).numpy())
    assert a["masked_latents"].shape == a["latents"].shape == a["initial_masked_latents"].shape
    assert (a["psnr_known_final"] > a["psnr_known_initial"]).all()
    assert not np.allclose(a["masked_latents"], a["latents"])  # the masked image is another image
    summary = json.loads((masked_run / "summary.json").read_text())
    assert summary["known_images_improved"] == n

    item = LatentDataset(masked_run / "latents.npz", inpainting=True)[0]
    assert item["latent"].shape == item["masked_latent"].shape == (4, 8, 8) and item["mask"].shape == (1, 8, 8)
    assert all(item[k].dtype == torch.float32 for k in ("latent", "mask", "masked_latent"))
    unet_input = torch.cat([torch.randn(1, 4, 8, 8), item["mask"][None], item["masked_latent"][None]], dim=1)
    assert unet_input.shape == (1, 9, 8, 8)


def test_inpainting_view_of_an_unmasked_dataset_is_refused(finished_run):
    with pytest.raises(GloError, match="exported without a mask"):
        LatentDataset(finished_run / "latents.npz", inpainting=True)


def write_masks(folder, ids, value=255, size=None):
    folder.mkdir()
    for i in ids:
        h, w = skimage.data.__getattribute__(i)().shape[:2]
        a = np.zeros((h, w), np.uint8)
        a[h // 4 : h // 2, w // 4 : w // 2] = value
        Image.fromarray(a).resize(size or (w, h)).save(folder / f"{i}.png")
    return folder


def test_folder_masks_binarize_at_the_documented_threshold(tmp_path):
    grey = write_masks(tmp_path / "grey", ["coffee"], value=140)  # 140/255 = 0.55
    assert FolderMasks(str(grey), threshold=0.5, known_only=False)("coffee", (400, 600), 64).sum() > 0
    assert FolderMasks(str(grey), threshold=0.6, known_only=False)("coffee", (400, 600), 64).sum() == 0


@pytest.mark.parametrize("case,message", [
    ("missing", "no mask for image id(s) coffee"),
    ("size", "coffee.png: mask is 32x32, image 'coffee' is 600x400"),
])
def test_bad_masks_are_one_line_and_write_nothing(tmp_path, case, message):
    ids = ["astronaut", "coffee"]
    folder = write_masks(tmp_path / "masks", ids[:1] if case == "missing" else ids)
    if case == "size":
        Image.new("L", (32, 32)).save(folder / "coffee.png")
    out = tmp_path / "run"
    p = run_glo(*FAST, "data.limit=2", "batch_size=1", "mask=folder", f"mask.path={folder}", f"hydra.run.dir={out}")
    assert p.returncode == 1
    errors = [line for line in p.stderr.splitlines() if line.startswith("glo: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in p.stderr, p.stderr[-2000:]
    # vetted with the images at start-up: before any model loads or any batch is computed
    assert "glo: VAE" not in p.stdout and not list(out.glob("shards/*.npz")) and not (out / "latents.npz").exists()


def test_folder_masks_run_end_to_end_and_an_edited_mask_recomputes_only_its_image(tmp_path):
    folder = write_masks(tmp_path / "masks", ["astronaut", "coffee"])
    out = tmp_path / "run"
    args = [*FAST, "data.limit=2", "batch_size=1", "mask=folder", f"mask.path={folder}", "report=false",
            f"hydra.run.dir={out}"]
    p = run_glo(*args)
    assert p.returncode == 0, p.stderr[-2000:]
    before = load_latents(out / "latents.npz")
    assert 0.05 < before["masks"].mean() < 0.2  # a quarter by a quarter of each image, after the centre crop
    astronaut = sorted((out / "shards").glob("shard-00000000-*.npz"))[0].read_bytes()
    Image.open(folder / "coffee.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "coffee.png")
    p = run_glo(*args)
    assert p.returncode == 0, p.stderr[-2000:]
    log = p.stdout + p.stderr
    assert "the mask of image 'coffee' has changed since" in log and "1 of 2 images to do" in log
    after = load_latents(out / "latents.npz")
    assert sorted((out / "shards").glob("shard-00000000-*.npz"))[0].read_bytes() == astronaut  # untouched
    assert np.array_equal(after["masks"][0], before["masks"][0])
    edited = FolderMasks(str(folder), threshold=0.5, known_only=False)("coffee", (400, 600), 64)
    assert np.array_equal(after["masks"][1], edited) and not np.array_equal(edited, before["masks"][1])


def test_two_masks_for_one_image_are_refused(tmp_path):
    """As two images with one id are: which of them a run would use is not the user's to guess."""
    folder = write_masks(tmp_path / "masks", ["coffee"])
    Image.open(folder / "coffee.png").save(folder / "coffee.jpg")
    with pytest.raises(GloError, match=r"mask.path=.*: two masks for image 'coffee' \(coffee.jpg, coffee.png\)"):
        FolderMasks(str(folder), threshold=0.5, known_only=False)


def test_gradfree_cannot_be_known_only(tmp_path):
    p = run_glo(*FAST, "optim=gradfree", "mask=boxes", "mask.known_only=true", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 1 and "optim=gradfree has no pixel loss" in p.stderr


def test_roundtrip_end_to_end(tmp_path):
    figures = tmp_path / "figures.md"
    p = run_glo(*FAST, "data.limit=2", "trips=3", "report_at=[1,3]", f"hydra.run.dir={tmp_path}",
                f"publish={figures}", module="glo.roundtrip")
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads((tmp_path / "roundtrip.json").read_text())
    assert [r["trips"] for r in result["rows"]] == [1, 3]
    assert np.array(result["per_trip"]["glo_known"]).shape == (3, 2)
    first = result["rows"][0]
    assert first["glo_known_psnr"] > first["plain_known_psnr"]  # one optimized trip beats the plain one
    assert "| 3 |" in (tmp_path / "roundtrip.md").read_text() and (tmp_path / "roundtrip.png").stat().st_size > 0
    section = figures.read_text().split("<!-- glo.roundtrip -->\n")[1]  # the table, under the command reproducing it
    assert section.startswith("`python -m glo.roundtrip vae=tiny_random ") and "publish=" not in section.splitlines()[0]
    assert "| 3 |" in section and section.rstrip().endswith("<!-- /glo.roundtrip -->")


@pytest.mark.parametrize("coverage", [[0.1], [0.3, 0.1], [0.1, 1.0], [0, 0.3], 0.2, "ab", [0.1, "x"], [True, 0.5]])
def test_a_coverage_that_is_not_a_range_is_one_clear_error(coverage):
    with pytest.raises(GloError, match=r"need two numbers 0 < low <= high < 1, e\.g\. 'mask\.coverage=\[0\.1,0\.3\]'"):
        RandomMasks("boxes", coverage, seed=0, known_only=False)


def test_an_unknown_mask_kind_names_the_known_ones():
    with pytest.raises(GloError, match="^mask.kind=circles: must be one of boxes, strokes$"):
        RandomMasks("circles", (0.1, 0.3), seed=0, known_only=False)


def test_an_impossible_coverage_range_is_one_clear_error():
    with pytest.raises(GloError, match="widen the range"):
        RandomMasks("boxes", (0.3, 0.3), seed=0, known_only=False)("astronaut", (64, 64), 16)  # 76.8 of 256 px


def test_a_masked_run_reports_drift_for_both_latents(masked_run):
    a = load_latents(masked_run / "latents.npz")
    for prefix, latents in (("", "latents"), ("masked_", "masked_latents")):
        z, z0 = a[latents], a[f"initial_{latents}"]
        distance = np.linalg.norm((z - z0).reshape(len(z), -1), axis=1) / np.linalg.norm(z0.reshape(len(z), -1), axis=1)
        np.testing.assert_allclose(a[f"{prefix}drift_distance"], distance, rtol=1e-5)
        np.testing.assert_allclose(a[f"{prefix}channel_std_final"], z.std((2, 3)), rtol=1e-5)
    summary = json.loads((masked_run / "summary.json").read_text())
    assert summary["masked_drift_distance_mean"] == pytest.approx(float(a["masked_drift_distance"].mean()))
    assert summary["drift_distance_mean"] != summary["masked_drift_distance_mean"]


def test_masked_export_means_what_its_names_say(masked_run, tiny_vae):
    """latents fit the whole image, masked_latents the image with its hole at 0, both in SD units."""
    a = load_latents(masked_run / "latents.npz")
    x = photos(len(a["ids"]))
    hole = torch.from_numpy(a["masks"][:, None].astype(np.float32))
    assert torch.allclose(torch.from_numpy(a["initial_latents"]), tiny_vae.encode(x), atol=VAE_FP32_ATOL)
    assert torch.allclose(torch.from_numpy(a["initial_masked_latents"]), tiny_vae.encode(x * (1 - hole)), atol=VAE_FP32_ATOL)
    with torch.no_grad():
        whole = psnr(tiny_vae.decode(torch.from_numpy(a["latents"])), x)
        masked = psnr(tiny_vae.decode(torch.from_numpy(a["masked_latents"])), x)
    assert (whole > masked).all()


@pytest.mark.parametrize("overrides,fix", [(["trips=2"], "trips=2 'report_at=[1, 2]'"),
                                           (["trips=3", "report_at=[1,5]"], "trips=3 'report_at=[1, 3]'")])
def test_roundtrip_report_rows_beyond_the_trips_are_one_line_with_a_fix(tmp_path, overrides, fix):
    p = run_glo(*FAST, *overrides, f"hydra.run.dir={tmp_path / 'rt'}", module="glo.roundtrip")
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1 and "every k of report_at must be <= trips" in err[0] and err[0].endswith(f"(e.g. {fix})")
    assert not (tmp_path / "rt" / "roundtrip.json").exists()


def test_the_module_fits_the_masked_image_on_its_known_pixels_when_asked(tiny_vae, monkeypatch):
    """GLOModule passes mask.known_only to the fit: the masked latents are those of a known-only fit, not of one
    that also matches the hole's grey."""
    from glo.app.module import GLOModule
    from glo.data.masks import batch_holes
    from glo.method.fit import fit_batch
    from glo.method.losses import PixelLoss
    from tests.conftest import photos, settings

    x, s, loss = photos(2, 64), settings(max_steps=4), PixelLoss("l2", 0, 1)
    meta = {"id": ["a", "b"], "source": ["a.png", "b.png"], "sha256": ["0", "1"], "height": torch.tensor([64, 64]),
            "width": torch.tensor([64, 64])}
    monkeypatch.setattr(GLOModule, "_log_images", lambda *a: None)  # TensorBoard's part needs a Trainer
    monkeypatch.setattr(GLOModule, "_on_step", lambda *a: None)
    out = {}
    for known_only in (True, False):
        masks = RandomMasks("boxes", (0.3, 0.4), seed=0, known_only=known_only)
        out[known_only] = GLOModule(tiny_vae, loss, s, 0, masks).predict_step((x, meta), 0)["masked_latents"]
    holes = batch_holes(masks, meta, 64)
    direct = fit_batch(tiny_vae, x, s, loss, holes, known_only=True).arrays["masked_latents"]
    assert np.array_equal(out[True], direct) and not np.allclose(out[True], out[False])
