"""One loading path for every image kind, and one-line errors naming the file."""
import hashlib
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from glo import GloError
from glo.data.images import BSDS500Dataset, FolderDataset, SampleDataset
from glo.data.pixels import to_rgb
from glo.prepare import main as prepare_main
from glo.prepare import prepare


def make_folder(root):
    """Images of the kinds users have: odd sizes, grey, alpha, palette, 16-bit, CMYK, PNG and JPEG."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rgb = rng.integers(0, 256, (321, 481, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "landscape.jpg", quality=95)
    Image.fromarray(rgb.transpose(1, 0, 2).copy()).save(root / "portrait.png")
    Image.fromarray(rgb[:, :, 0]).save(root / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(root / "alpha.png")
    Image.fromarray(rgb).convert("P").save(root / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray((rgb[:, :, 1].astype(np.uint16) * 257)).save(root / "deep16.png")
    (root / "notes.txt").write_text("not an image, ignored by suffix")
    return rgb


def test_folder_loads_every_kind_as_rgb_in_range(tmp_path):
    rgb = make_folder(tmp_path)
    ds = FolderDataset(str(tmp_path), size=64)
    assert ds.ids == ["alpha", "cmyk", "deep16", "grey", "landscape", "palette", "portrait"]
    for i in range(len(ds)):
        image, meta = ds[i]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert -1.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.1
    _, meta = ds[ds.ids.index("portrait")]
    assert (meta["height"], meta["width"]) == (481, 321)
    (tmp_path / "eight").mkdir()
    Image.fromarray(rgb[:, :, 1]).save(tmp_path / "eight" / "deep8.png")
    eight = FolderDataset(str(tmp_path / "eight"), size=64)[0][0]
    assert (ds[ds.ids.index("deep16")][0] - eight).abs().max() <= 1 / 127.5  # 16-bit scaled, not clipped to white


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_a_dark_deep_image_stays_dark(mode):
    """The scale comes from the mode's bit depth: a 16-bit image whose brightest pixel is 200 of 65535 is nearly
    black, and a float image at 0.25 is a quarter grey, whatever their own maxima."""
    value, expected = {"I;16": (200, 1), "I": (200, 1), "F": (0.25, 64)}[mode]
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    img = Image.fromarray(np.full((16, 16), value, dtype))
    assert img.mode == mode
    assert np.asarray(to_rgb(img)).max() == expected


def test_prepare_again_into_the_same_folder_replaces_the_split(tmp_path):
    """Nothing of the first prepare is left for a run to read: not its other images, not its size."""
    make_folder(tmp_path / "many")
    prepare(str(tmp_path / "many"), str(tmp_path / "out"), "val", size=64)
    (tmp_path / "few").mkdir()
    Image.fromarray(np.full((80, 80, 3), 9, np.uint8)).save(tmp_path / "few" / "only.png")
    stats = prepare(str(tmp_path / "few"), str(tmp_path / "out"), "val", size=128)
    assert [f.name for f in (tmp_path / "out" / "val" / "images").iterdir()] == ["only.npz"]
    assert stats["count"] == 1 and json.loads((tmp_path / "out" / "val" / "stats.json").read_text())["size"] == 128
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["val"]  # no build or old copy left beside it
    (tmp_path / "out" / "val" / "mine.txt").write_text("a user's file")
    with pytest.raises(GloError, match="is not a glo.prepare split"):
        prepare(str(tmp_path / "few"), str(tmp_path / "out"), "val", size=64)
    assert (tmp_path / "out" / "val" / "mine.txt").is_file()


def test_resize_keeps_shorter_side_and_centre_crops(tmp_path):
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = 255  # the centre third is white: all a centre crop should see
    Image.fromarray(img).save(tmp_path / "a.png")
    image, _ = FolderDataset(str(tmp_path), size=96)[0]
    assert image.shape == (3, 96, 96) and image[:, :, 2:-2].min() > 0.95


def test_a_portrait_image_is_cropped_at_its_centre_too(tmp_path):
    img = np.zeros((300, 100, 3), np.uint8)
    img[100:200] = 255  # the middle third of a tall image is white
    Image.fromarray(img).save(tmp_path / "tall.png")
    image, meta = FolderDataset(str(tmp_path), size=96)[0]
    assert image.shape == (3, 96, 96) and image[:, 2:-2].min() > 0.95
    assert (int(meta["height"]), int(meta["width"])) == (300, 100)


def test_exif_orientation_is_applied_and_recorded(tmp_path):
    img = np.zeros((32, 64, 3), np.uint8)  # stored landscape, left half white
    img[:, :32] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view": the photo is a portrait
    Image.fromarray(img).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    Image.fromarray(img).save(tmp_path / "scan.jpg", quality=95)  # no orientation tag: not turned
    exif[0x0112] = 1
    Image.fromarray(img).save(tmp_path / "upright.jpg", exif=exif, quality=95)  # tagged upright: not turned
    ds = FolderDataset(str(tmp_path), size=32)
    image, meta = ds[0]
    assert (meta["height"], meta["width"]) == (64, 32) and ds.turned == [str(tmp_path / "phone.jpg")]
    assert image[:, :8].mean() > 0.9 and image[:, -8:].mean() < -0.9  # upright, the white half is on top


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_a_dangling_symlink_is_named_not_dropped(tmp_path, on_error):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "good.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    if on_error == "fail":
        with pytest.raises(GloError, match=r"gone\.png: not a readable image"):
            FolderDataset(str(tmp_path), size=32)
    else:
        ds = FolderDataset(str(tmp_path), size=32, on_error="skip")
        assert ds.ids == ["good"] and [s["source"] for s in ds.skipped] == [str(tmp_path / "gone.png")]


def test_samples_are_offline_photos():
    ds = SampleDataset(size=64, limit=2)
    image, meta = ds[1]
    assert len(ds) == 2 and ds[0][1]["source"] == "skimage.data.astronaut" and image.shape == (3, 64, 64)
    assert (meta["id"], meta["height"], meta["width"]) == ("coffee", 400, 600)  # the photo's own size


@pytest.mark.parametrize("bad,match", [
    ("missing", "no such directory"), ("empty", "no image files"), ("size", "multiple of 8"),
])
def test_bad_folders_are_one_clear_error(tmp_path, bad, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    path = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "size": tmp_path / "empty"}[bad]
    with pytest.raises(GloError, match=match) as e:
        FolderDataset(str(path), size=60 if bad == "size" else 64)
    assert "subfolders" not in str(e.value) and (bad != "empty" or str(e.value).endswith(".bmp)"))  # no hint here


def test_a_folder_of_split_folders_names_them(tmp_path):
    for split in ("val", "train", "test"):
        make_folder(tmp_path / split)
    with pytest.raises(GloError, match=r"no image files .*; it has subfolders \(test, train, val\): point data.path at one$"):
        FolderDataset(str(tmp_path), size=64)
    for name in "abcdef":
        (tmp_path / "many" / name).mkdir(parents=True)
    with pytest.raises(GloError, match=r"\(a, b, c, d, e\): point"):  # a few names, not a thousand class folders
        FolderDataset(str(tmp_path / "many"), size=64)


def test_a_folder_dataset_takes_the_first_limit_images_by_name(tmp_path):
    make_folder(tmp_path)
    every = FolderDataset(str(tmp_path), size=64).ids
    assert len(every) > 2 and FolderDataset(str(tmp_path), size=64, limit=2).ids == every[:2] == sorted(every)[:2]


@pytest.mark.parametrize("content", [b"", b"this is text, not a PNG", "truncated"])
def test_corrupt_file_names_the_file(tmp_path, content):
    if content == "truncated":
        Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 9).save(tmp_path / "x.png")
        content = (tmp_path / "x.png").read_bytes()[:100]
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(GloError, match=r"x\.png: not a readable image"):
        FolderDataset(str(tmp_path), size=64)[0]


def test_prepare_writes_npz_and_stats_that_bsds500dataset_reads(tmp_path):
    make_folder(tmp_path / "src" / "train")
    stats = prepare(str(tmp_path / "src"), str(tmp_path / "out"), "train", size=64)
    files = sorted((tmp_path / "out" / "train" / "images").glob("*.npz"))
    assert [f.stem for f in files] == FolderDataset(str(tmp_path / "src" / "train"), 64).ids
    assert stats["count"] == 7 and stats["size"] == 64 and len(stats["channel_mean"]) == 3
    assert stats["original_sizes"] == {"321x481": 6, "481x321": 1}
    ds = BSDS500Dataset(str(tmp_path / "out"), "train", cache_in_memory=True, size=64)
    assert ds.turned == []  # prepared files are upright already
    image, meta = ds[ds.ids.index("landscape")]
    assert image.shape == (3, 64, 64) and meta["source"].endswith("landscape.jpg")
    assert (meta["height"], meta["width"]) == (321, 481)
    direct, _ = FolderDataset(str(tmp_path / "src" / "train"), 64)[4]
    assert np.array_equal(image, direct)  # one path: prepared and direct loading agree exactly
    assert not list((tmp_path / "out").rglob("*.tmp"))
    pixels = np.stack([np.load(f)["image"] for f in files]).reshape(-1, 3) / 255.0  # equal sizes: pooled = mean of means
    np.testing.assert_allclose(stats["channel_mean"], pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["channel_std"], pixels.std(0), rtol=1e-5)
    assert json.loads((tmp_path / "out" / "train" / "stats.json").read_text()) == stats
    assert stats["split"] == "train" and stats["source"] == str((tmp_path / "src" / "train").resolve())


def test_prepare_cli_errors_are_one_line(tmp_path, capsys):
    make_folder(tmp_path / "src")
    with pytest.raises(SystemExit) as e:
        prepare_main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--size", "250"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "multiple of 8" in err[0] and err[0].startswith("glo.prepare: error: --size=250:")
    assert not (tmp_path / "out").exists()
    with pytest.raises(GloError, match=r"^--src=.*nowhere: no such directory$"):  # its own option, not data.path
        prepare(str(tmp_path / "nowhere"), str(tmp_path / "out"), "train", size=64)
    with pytest.raises(GloError, match=r"^--out /proc/x: cannot create a folder there \("):  # no traceback
        prepare(str(tmp_path / "src"), "/proc/x", "train", size=64)


def test_prepare_with_a_split_the_root_lacks_names_the_splits_it_has(tmp_path):
    make_folder(tmp_path / "src" / "train")
    make_folder(tmp_path / "src" / "val")
    with pytest.raises(GloError, match=r"no 'nope' subfolder and no images of its own; pass --split one of train, val$"):
        prepare(str(tmp_path / "src"), str(tmp_path / "out"), "nope", size=64)
    make_folder(tmp_path / "flat" / "thumbs")
    make_folder(tmp_path / "flat")  # images of its own: the folder itself is the split, whatever --split says
    assert prepare(str(tmp_path / "flat"), str(tmp_path / "out"), "any", size=64)["count"] == 7


def test_a_split_prepared_smaller_than_data_size_is_refused_with_a_command_that_works(tmp_path):
    """Upscaling the 64 px copy to 128 px is not what the originals give at 128 px: refused, and the command the
    line gives prepares a split that then loads, as the originals would."""
    make_folder(tmp_path / "src" / "val")
    prepare(str(tmp_path / "src"), str(tmp_path / "out"), "val", size=64)
    assert BSDS500Dataset(str(tmp_path / "out"), "val", size=32, limit=1).ids == ["alpha"]  # shrinking is fine
    with pytest.raises(GloError) as e:
        BSDS500Dataset(str(tmp_path / "out"), "val", size=128)
    line = str(e.value)
    assert line.startswith(f"{tmp_path / 'out' / 'val'}: prepared at 64 px, smaller than data.size=128; ")
    command = re.search(r"python -m glo.prepare (.*?), then add data.processed_data_dir=(\S+) \(or run with "
                        r"data.size=64\)$", line)
    prepare_main(command[1].split())
    again = BSDS500Dataset(command[2], "val", size=128)
    direct = FolderDataset(str(tmp_path / "src" / "val"), 128)
    assert again.ids == direct.ids and np.array_equal(again[0][0], direct[0][0])


def test_bsds500_dataset_without_prepare_says_what_to_run(tmp_path):
    with pytest.raises(GloError, match="glo.prepare --split val"):
        BSDS500Dataset(str(tmp_path), "val")


@pytest.mark.parametrize("array", [np.zeros((8, 8), np.float32), np.zeros((8, 8, 3), np.float32),
                                   np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8), np.uint8)])
def test_bsds500_dataset_rejects_a_wrong_array(tmp_path, array):
    folder = tmp_path / "val" / "images"
    folder.mkdir(parents=True)
    np.savez(folder / "a.npz", image=array, meta=np.array("{}"))
    with pytest.raises(GloError, match=r"a\.npz: .*expected uint8.*, or run with data\.on_error=skip to leave such files out$"):
        BSDS500Dataset(str(tmp_path), "val", size=64)[0]


def write_bad_files(folder):
    """One of each bad file a real folder holds, beside two good images."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), "red").save(folder / "good1.png")
    Image.new("RGB", (48, 64), "blue").save(folder / "good2.jpg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image at all")
    Image.new("RGB", (64, 64), "green").save(folder / "cut.png")
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:60])
    Image.new("RGB", (5, 5), "white").save(folder / "tiny.png")
    return {"empty", "text", "cut", "tiny"}


def test_skip_leaves_bad_files_out_and_lists_them(tmp_path, caplog):
    bad = write_bad_files(tmp_path)
    ds = FolderDataset(str(tmp_path), size=32, on_error="skip")
    assert ds.ids == ["good1", "good2"] and ds[1][0].shape == (3, 32, 32)
    assert {s["source"].split("/")[-1].split(".")[0] for s in ds.skipped} == bad
    assert "smaller than 8 px" in " ".join(s["reason"] for s in ds.skipped)
    assert sorted(r.getMessage() for r in caplog.records) == sorted(f"skipping {s['reason']}" for s in ds.skipped)


def test_two_files_with_one_id_are_refused(tmp_path):
    """a.png and a.jpg would both be row 'a': which latent is which could not be told apart."""
    for name in ("a.png", "a.jpg", "b.png", "b.webp", "c.png"):
        Image.new("RGB", (16, 16), "red").save(tmp_path / name)
    with pytest.raises(GloError, match=r"^image ids must be unique; these file names repeat: a, b$"):
        FolderDataset(str(tmp_path), size=16, limit=1)  # also when the limit would stop before the twin


def test_a_limit_counts_the_images_kept_not_the_files_tried(tmp_path):
    """Sorted, cut.png and empty.png come first: data.limit=2 still gives two images, and files after them are
    not read, so they are not listed as skipped."""
    write_bad_files(tmp_path)
    ds = FolderDataset(str(tmp_path), size=32, limit=2, on_error="skip")
    assert ds.ids == ["good1", "good2"]
    assert sorted(s["source"].split("/")[-1] for s in ds.skipped) == ["cut.png", "empty.png"]
    assert FolderDataset(str(tmp_path), size=32, limit=1, on_error="skip").ids == ["good1"]


@pytest.mark.parametrize("name", ["empty.png", "text.jpg", "cut.png", "tiny.png"])
def test_fail_stops_at_the_bad_file_before_any_model(tmp_path, name):
    write_bad_files(tmp_path / "all")
    (tmp_path / "one").mkdir()
    (tmp_path / "all" / name).rename(tmp_path / "one" / name)
    Image.new("RGB", (64, 64)).save(tmp_path / "one" / "ok.png")
    with pytest.raises(GloError, match=rf"{name}: not a readable image"):
        FolderDataset(str(tmp_path / "one"), size=32)


def test_very_large_jpeg_is_resized_and_keeps_its_original_size(tmp_path):
    big = np.kron(np.random.default_rng(0).integers(0, 256, (60, 90, 3)), np.ones((50, 50, 1))).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)  # 4500 x 3000
    image, meta = FolderDataset(str(tmp_path), size=256)[0]
    assert image.shape == (3, 256, 256) and (meta["width"], meta["height"]) == (4500, 3000)


@pytest.mark.parametrize("key, hint", [("data.path", ", or run with data.on_error=skip to leave such files out"),
                                       ("data.train", "")])
def test_a_bad_file_stops_with_the_way_past_it(tmp_path, key, hint):
    """glo.run's folder names the setting that skips bad files; glo.train_vae's folders have no such setting."""
    (tmp_path / "x.png").write_bytes(b"text")
    with pytest.raises(GloError, match=rf"x\.png: not a readable image \(.*\); replace or remove it{re.escape(hint)}$"):
        FolderDataset(str(tmp_path), size=16, key=key)


def test_unknown_on_error_is_rejected(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    with pytest.raises(GloError, match="on_error=ignore"):
        FolderDataset(str(tmp_path), size=16, on_error="ignore")


def test_every_image_carries_the_sha256_of_the_file_its_pixels_came_from(tmp_path):
    make_folder(tmp_path / "src" / "train")
    folder = FolderDataset(str(tmp_path / "src" / "train"), 64)
    prepare(str(tmp_path / "src"), str(tmp_path / "out"), "train", size=64)
    prepared = BSDS500Dataset(str(tmp_path / "out"), "train", size=64)
    for ds, path in ((folder, lambda i: folder.files[i]), (prepared, lambda i: prepared.files[i])):
        expected = {ds.ids[i]: hashlib.sha256(path(i).read_bytes()).hexdigest() for i in range(len(ds))}
        assert ds.digests() == expected and ds[2][1]["sha256"] == expected[ds.ids[2]]
    samples = SampleDataset(size=64, limit=3)
    assert len(set(samples.digests().values())) == 3 and samples.digests() == SampleDataset(size=64, limit=3).digests()


def test_pixels_map_0_and_255_to_minus_1_and_1_and_8_bits_round_to_nearest():
    """to_tensor: 8-bit v -> v / 127.5 - 1 exactly (so 255 -> 1, not 255/128 - 1); to_8bit rounds to the nearest of
    the 256 levels (a floor would darken every image by half a level on average)."""
    from glo.data.pixels import to_8bit, to_tensor

    img = Image.fromarray(np.array([[[0, 128, 255]]], np.uint8))
    assert torch.allclose(to_tensor(img).flatten(), torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]), rtol=0, atol=1e-6)
    level = 2 / 255  # one 8-bit level in [-1, 1]
    x = torch.tensor([-1 + 0.6 * level, -1 + 0.4 * level, 1.5])
    assert torch.allclose(to_8bit(x), torch.tensor([-1 + level, -1.0, 1.0]), atol=1e-6)


def test_images_are_resized_with_lanczos_and_masks_with_nearest(tmp_path):
    """A photo is shrunk with a Lanczos filter (nearest-neighbour would alias its detail); a mask keeps 0 and 1
    only, never the grey of a filtered edge."""
    from glo.data.masks import FolderMasks
    from glo.data.pixels import resize_center_crop

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    got = np.asarray(resize_center_crop(img, 32))
    lanczos = np.asarray(img.resize((48, 32), Image.Resampling.LANCZOS).crop((8, 0, 40, 32)))
    assert np.array_equal(got, lanczos)
    (tmp_path / "masks").mkdir()
    stripes = np.zeros((64, 96), np.uint8)
    stripes[:, ::3] = 255  # thin lines: any filter but nearest leaves grey between them
    Image.fromarray(stripes).save(tmp_path / "masks" / "a.png")
    mask = FolderMasks(str(tmp_path / "masks"), 0.5, False)("a", (64, 96), 32)
    assert set(np.unique(mask)) <= {0.0, 1.0} and 0 < mask.mean() < 1
