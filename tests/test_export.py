"""The dataset on disk: exact round trip, atomic files, one-line errors for damaged ones."""
import json
import os
import pickle
import re
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from glo import GloError, Stopped
from glo.app.export import LatentExporter
from glo.latents import LatentDataset, load_latents, open_latents
from glo.layout import COLUMNS, DRIFT, row_problem
from glo.store.summary import drift_summary, summarize
from tests.conftest import declared_rows


def batch(ids, seed):
    rng = np.random.default_rng(seed)
    n = len(ids)
    curves = rng.random((n, 5)).astype(np.float32)
    curves[0, 3:] = np.nan
    return declared_rows(
        ids, seed, latents=rng.standard_normal((n, 4, 8, 8)).astype(np.float32),
        initial_latents=rng.standard_normal((n, 4, 8, 8)).astype(np.float32),
        steps=np.array([3] + [5] * (n - 1)), initial_loss=np.full(n, 0.5, np.float32),
        final_loss=np.array([0.4] + [0.6] * (n - 1), np.float32),
        psnr_initial=np.full(n, 20.0, np.float32), psnr_final=np.array([21.5] * (n - 1) + [19.5], np.float32),
        ssim_initial=np.full(n, 0.5, np.float32), ssim_final=np.full(n, 0.6, np.float32),
        converged=np.array([True] + [False] * (n - 1)), loss_curves=curves, seconds=np.full(n, 0.25),
    )


def export(out, batches, format="npz", metadata=None):
    exporter = LatentExporter(str(out), format)
    exporter.metadata.update(metadata or {})
    trainer = SimpleNamespace(global_rank=0)
    start = 0
    for b in batches:
        exporter.on_predict_batch_end(trainer, None, b, (None, {"index": [start]}), 0)  # (images, meta) as collated
        start += len(b["ids"])
    exporter.merge()
    return exporter


def test_round_trip_is_exact_and_summary_follows(tmp_path):
    b1, b2 = batch(["a", "b"], 0), batch(["c"], 1)
    exporter = export(tmp_path, [b1, b2])
    back = load_latents(tmp_path / "latents.npz")
    for key in b1:
        assert np.array_equal(back[key], np.concatenate([b1[key], b2[key]]), equal_nan=key == "loss_curves"), key
    s = exporter.summary
    assert s["num_images"] == 3 and s["images_improved"] == 1 and s["converged"] == 2  # gains +1.5, -0.5, -0.5
    assert s["psnr_gain_mean"] == pytest.approx(0.5 / 3) and s["images_per_second"] == pytest.approx(4.0)
    assert exporter.done_ids() == {"a", "b", "c"}
    assert not list(tmp_path.rglob("*.tmp"))


def test_latent_dataset_feeds_training(tmp_path):
    b = batch(["a", "b"], 0)
    export(tmp_path, [b])
    ds = LatentDataset(tmp_path / "latents.npz")
    item = ds[1]
    assert len(ds) == 2 and item["id"] == "b" and item["latent"].dtype == torch.float32
    assert torch.equal(item["latent"], torch.from_numpy(b["latents"][1]))
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    assert next(iter(loader))["latent"].shape == (2, 4, 8, 8)
    with pytest.raises(GloError, match=r"latents\.npz: exported without a mask; run glo.run with mask="):
        LatentDataset(tmp_path / "latents.npz", inpainting=True)


def test_damaged_or_missing_file_is_named(tmp_path):
    export(tmp_path, [batch(["a"], 0)])
    path = tmp_path / "latents.npz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(GloError, match=r"latents\.npz: not a readable latents file"):
        load_latents(path)
    with pytest.raises(GloError, match=r"nothing\.npz: no such file"):
        LatentDataset(tmp_path / "nothing.npz")


def latents_offset(path, format):
    """Where the first latent's bytes lie in the file: inside the NPZ member, or inside HDF5's first chunk."""
    if format == "npz":
        return path.read_bytes().index(load_latents(path)["latents"][:1].tobytes()[:64]) + 100
    with h5py.File(path) as f:
        chunk = f["latents"].id.get_chunk_info(0)
    return chunk.byte_offset + chunk.size // 2


@pytest.mark.parametrize("format", ["npz", "hdf5"])
def test_a_flipped_byte_in_the_latents_is_found_by_every_reader(tmp_path, format):
    """NPZ members are memory-mapped, which skips the zip's CRC: it is checked on open. HDF5 chunks check their
    own Fletcher-32 sums on every read."""
    export(tmp_path, [batch(["a", "b"], 0)], format)
    path = tmp_path / ("latents.npz" if format == "npz" else "latents.h5")
    data = bytearray(path.read_bytes())
    data[latents_offset(path, format)] ^= 0x40
    path.write_bytes(data)
    for read in (load_latents, lambda p: LatentDataset(p)[0], lambda p: LatentDataset(p)[1]):
        with pytest.raises(GloError, match=rf"^{path}: damaged \("):
            read(path)


def test_a_dataset_that_disagrees_with_its_shards_is_refused_by_every_reader(tmp_path):
    """A resume stopped before its merge: the shards list an image the dataset file does not hold."""
    export(tmp_path, [batch(["a", "b"], 0)])
    manifest = tmp_path / "shards" / "manifest-0.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "shard-00000002-x.npz": ["c"]}))
    for read in (load_latents, open_latents, LatentDataset):
        with pytest.raises(GloError, match="holds other images than .*shards lists, so its run stopped before"):
            read(tmp_path / "latents.npz")


@pytest.mark.parametrize("text", ["[{", '{"a": 1}'])
def test_a_damaged_sessions_record_is_one_line_before_any_work(tmp_path, text):
    exporter = LatentExporter(str(tmp_path), "npz")
    exporter.shards.mkdir()
    exporter.sessions.write_text(text)
    with pytest.raises(GloError, match=r"sessions.json: (damaged|not a list).*delete it and run the same command"):
        exporter.verify({})


def test_a_failed_write_leaves_no_file_that_looks_complete(tmp_path, monkeypatch):
    exporter = LatentExporter(str(tmp_path), "npz")

    def broken_savez(f, **arrays):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        exporter.on_predict_batch_end(SimpleNamespace(global_rank=0), None, batch(["a"], 0), (None, {"index": [0]}), 0)
    assert list(tmp_path.rglob("*")) == [tmp_path / "shards"]


def test_hdf5_holds_the_same_arrays_as_npz_and_reads_lazily(tmp_path, monkeypatch):
    batches = [batch(["a", "b"], 0), batch(["c"], 1)]
    export(tmp_path / "npz", batches)
    export(tmp_path / "h5", batches, format="hdf5", metadata={"config": {"lr": 0.25}})
    with h5py.File(tmp_path / "h5" / "latents.h5") as f:  # the file alone says what made it
        inside = json.loads(f.attrs["metadata"])
    assert inside["config"] == {"lr": 0.25} and inside == json.loads((tmp_path / "h5" / "metadata.json").read_text())
    a, b = load_latents(tmp_path / "npz" / "latents.npz"), load_latents(tmp_path / "h5" / "latents.h5")
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=key == "loss_curves"), key
    for path in (tmp_path / "npz" / "latents.npz", tmp_path / "h5" / "latents.h5"):
        lazy = open_latents(path)["latents"]
        assert not isinstance(lazy, np.ndarray) or isinstance(lazy, np.memmap)  # mapped or chunked, not loaded
        ds = LatentDataset(path)
        assert ds.ids == ["a", "b", "c"] and torch.equal(ds[2]["latent"], torch.from_numpy(a["latents"][2]))
        # DataLoader workers: spawn pickles the dataset (an open HDF5 file cannot be, a memory map would be
        # copied whole), fork inherits it (each process must open its own HDF5 handle)
        sent = pickle.dumps(ds)
        assert len(sent) < a["latents"].nbytes and torch.equal(pickle.loads(sent)[1]["latent"], ds[1]["latent"])
        opened = ds._arrays
        with monkeypatch.context() as m:
            m.setattr(os, "getpid", lambda: -1)
            assert torch.equal(ds[0]["latent"], torch.from_numpy(a["latents"][0])) and ds._arrays is not opened


def test_unknown_export_format_is_rejected(tmp_path):
    with pytest.raises(GloError, match="export.format=zarr"):
        LatentExporter(str(tmp_path), "zarr")


def test_summary_is_every_headline_figure_computed_by_hand():
    a = {"ids": np.array(["a", "b", "c", "d"]), "psnr_initial": np.array([20.0, 21, 22, 23]),
         "psnr_final": np.array([21.0, 21, 25, 22]), "ssim_initial": np.array([0.1, 0.2, 0.3, 0.4]),
         "ssim_final": np.array([0.5, 0.5, 0.5, 0.9]), "steps": np.array([1, 2, 3, 6]),
         "passes": np.array([1.5, 2.5, 3.5, 6.5]), "converged": np.array([True, False, True, True]),
         "nonfinite": np.array([False, True, False, False]), "seconds": np.array([0.5, 0.5, 1.0, 2.0]),
         "psnr_known_initial": np.array([10.0, 12, 14, 16]), "psnr_known_final": np.array([11.0, 12, 13, 20])}
    assert summarize(a) == {
        "num_images": 4, "psnr_initial_mean": 21.5, "psnr_final_mean": 22.25, "psnr_gain_mean": 0.75,
        "ssim_initial_mean": pytest.approx(0.25), "ssim_final_mean": pytest.approx(0.6), "images_improved": 2,
        "steps_mean": 3.0, "passes_mean": 3.5, "converged": 3, "nonfinite": 1, "seconds_total": 4.0,
        "images_per_second": 1.0, "psnr_known_initial_mean": 13.0, "psnr_known_final_mean": 14.0,
        "psnr_known_initial_median": 13.0, "psnr_known_final_median": 12.5, "psnr_known_improved_fraction": 0.5,
        "known_images_improved": 2, "images_without_known_pixels": 0}
    a["seconds"] = np.zeros(4)
    assert np.isnan(summarize(a)["images_per_second"])


def rows(n, **columns):
    """The columns `summarize` needs for n images (each gains 1 dB in 1 s), with `columns` on top."""
    return {"ids": np.array([f"img{i}" for i in range(n)]), "psnr_initial": np.zeros(n), "psnr_final": np.ones(n),
            "ssim_initial": np.zeros(n), "ssim_final": np.ones(n), "steps": np.ones(n), "converged": np.zeros(n, bool),
            "nonfinite": np.zeros(n, bool), "seconds": np.ones(n), **columns}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # means of no rows
def test_ranks_working_at_once_count_by_the_busiest_ones_seconds():
    a = rows(5, seconds=np.array([1.0, 2.0, 1.0, 0.5, 0.5]), rank=np.array([0, 1, 0, 1, 1]))
    s = summarize(a)
    assert s["seconds_total"] == 5.0 and s["images_per_second"] == pytest.approx(5 / 3)  # rank 1 took 3 s, rank 0 2 s
    assert np.isnan(summarize({k: v[:0] for k, v in a.items()})["images_per_second"])  # no rows: no rate, no crash


def test_summary_carries_the_drift_of_full_and_masked_latents():
    rng = np.random.default_rng(0)
    drift = {f"{p}{k}": rng.random((3, 4, 4) if "moment" in k else (3, 4) if "channel" in k else 3) for p in ("", "masked_") for k in DRIFT}
    a = rows(3, **drift)
    s = summarize(a)
    assert s["drift_distance_mean"] == pytest.approx(drift["drift_distance"].mean())
    assert s["masked_drift_distance_mean"] == pytest.approx(drift["masked_drift_distance"].mean())
    assert {k: s[k] for k in drift_summary(a, "masked_")} == drift_summary(a, "masked_")
    assert {k: s[k] for k in drift_summary(a)} == drift_summary(a)


def test_shards_with_other_columns_are_refused_not_misaligned(tmp_path):
    old = batch(["a"], 0)
    new = {**batch(["b"], 1), "masked_steps": np.zeros(1, np.int64)}
    for fmt in ("npz", "hdf5"):
        with pytest.raises(GloError, match=r"shard-00000001-\w+\.npz: has other columns than shard-00000000-\w+\.npz "
                                           r"\('masked_steps' in one only\).*resume=restart"):
            export(tmp_path / fmt, [old, new], format=fmt)
        assert not list((tmp_path / fmt).glob("latents.*"))


def test_inpainting_items_are_the_exported_conditioning(tmp_path):
    b = batch(["a", "b"], 0)
    rng = np.random.default_rng(5)
    b.update(latent_masks=(rng.random((2, 1, 8, 8)) > 0.5).astype(np.float32),
             masked_latents=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
             initial_masked_latents=rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    for fmt, name in (("npz", "latents.npz"), ("hdf5", "latents.h5")):
        export(tmp_path / fmt, [b], format=fmt)
        item = LatentDataset(tmp_path / fmt / name, inpainting=True)[1]
        assert set(item) == {"id", "latent", "initial_latent", "mask", "masked_latent", "initial_masked_latent"}
        assert item["id"] == "b"
        for key, array in (("latent", "latents"), ("initial_latent", "initial_latents"), ("mask", "latent_masks"),
                           ("masked_latent", "masked_latents"), ("initial_masked_latent", "initial_masked_latents")):
            assert item[key].dtype == torch.float32 and torch.equal(item[key], torch.from_numpy(b[array][1])), key


def test_merging_in_another_format_removes_the_first_and_records_the_end(tmp_path):
    export(tmp_path, [batch(["a"], 0)])
    exporter = export(tmp_path, [], format="hdf5")
    assert not (tmp_path / "latents.npz").exists() and list(load_latents(tmp_path / "latents.h5")["ids"]) == ["a"]
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["end_time"] == exporter.metadata["end_time"] and meta["end_time"].endswith("+00:00")
    export(tmp_path, [], format="npz")
    assert not (tmp_path / "latents.h5").exists() and (tmp_path / "latents.npz").is_file()


def test_a_file_is_synced_to_disk_before_it_takes_its_name(tmp_path, monkeypatch):
    """Renamed but unsynced, a power cut could leave a complete-looking name over missing data."""
    synced = []
    monkeypatch.setattr("os.fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    export(tmp_path, [batch(["a"], 0)], format="hdf5")
    names = [os.path.basename(p) for p in synced]
    for name in ("latents.h5", "metadata.json", "summary.json"):
        assert any(n.startswith(f".{name}.") for n in names), (name, names)


NAMES = ["снимок один", "写真 2", "caf\udce9"]  # Cyrillic, CJK with a space, and Latin-1 bytes (not UTF-8)


@pytest.mark.parametrize("format", ["npz", "hdf5"])
def test_any_file_name_round_trips_through_every_format_and_reader(tmp_path, format):
    export(tmp_path, [batch(NAMES, 0)], format=format)
    path = tmp_path / ("latents.h5" if format == "hdf5" else "latents.npz")
    assert list(load_latents(path)["ids"]) == NAMES and LatentDataset(path).ids == NAMES


def test_an_altered_id_in_hdf5_is_found_by_every_reader(tmp_path):
    export(tmp_path, [batch(["a", "b", "c"], 0)], format="hdf5")
    copy = tmp_path / "copy"
    copy.mkdir()
    (tmp_path / "latents.h5").rename(copy / "latents.h5")  # outside its run: no manifest to compare with
    with h5py.File(copy / "latents.h5", "r+") as f:
        f["ids"][1] = b"x"  # what an edit of the string heap does: the same length, another id
    for read in (load_latents, LatentDataset):
        with pytest.raises(GloError, match=r"its 'ids' differ from what was written"):
            read(copy / "latents.h5")


def test_every_numeric_hdf5_column_checks_its_chunks(tmp_path):
    export(tmp_path, [batch(["a", "b"], 0)], format="hdf5")
    with h5py.File(tmp_path / "latents.h5") as f:
        numeric = [k for k, d in f.items() if d.dtype != object]
        assert numeric and all(f[k].fletcher32 for k in numeric), [k for k in numeric if not f[k].fletcher32]


def test_a_file_digest_covers_every_byte(tmp_path):
    """A change past the first MiB (an edited image that keeps its header) must change the digest."""
    import hashlib

    from glo.data.digests import sha256_file

    data = bytearray(np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    (tmp_path / "f").write_bytes(data)
    before = sha256_file(tmp_path / "f")
    data[-1] ^= 1
    (tmp_path / "f").write_bytes(data)
    assert before != sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_a_vaes_fingerprint_covers_its_config(tmp_path):
    """A changed config.json (another scaling factor) is another VAE: a run must not resume as if the same."""
    import shutil

    from glo.store.rundir import weights_sha256
    from tests.conftest import ROOT

    vae = tmp_path / "vae"
    shutil.copytree(ROOT / "glo" / "standin" / "standin_vae", vae)
    before = weights_sha256(vae)
    config = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    assert weights_sha256(vae) not in (before, None)


@pytest.mark.parametrize("stopped", [True, False], ids=["another_rank_stopped", "a_real_fault"])
def test_a_barrier_broken_by_a_stopped_rank_is_the_stop_and_any_other_break_is_its_error(tmp_path, stopped):
    exporter = LatentExporter(str(tmp_path), "npz")
    exporter.shards.mkdir()
    if stopped:
        exporter.stop_file.write_text("SIGTERM\n")

    def barrier(name: str) -> None:
        raise RuntimeError("Connection closed by peer")

    trainer = SimpleNamespace(strategy=SimpleNamespace(barrier=barrier), is_global_zero=True)
    with pytest.raises(Stopped if stopped else RuntimeError) as e:
        exporter.on_predict_end(trainer, None)
    if stopped:
        assert str(e.value).startswith("stopped by SIGTERM to another rank; 0 image(s) are safe")


def test_a_run_exports_exactly_the_declared_columns(finished_run):
    a = load_latents(finished_run / "latents.npz")
    assert set(a) == set(COLUMNS) and row_problem(a) is None


@pytest.mark.parametrize("change, problem", [
    ({"lossy": np.zeros(2)}, "column 'lossy' is not declared in glo.layout"),
    ({"steps": np.zeros(2)}, "column 'steps' is float64(2,), declared i (rows)"),
    ({"latents": np.zeros((2, 4, 8), np.float32)}, "column 'latents' is float32(2, 4, 8), declared f (rows, C, h, w)"),
    ({"rank": np.zeros(3, np.int64)}, "column 'rank' is int64(3,), declared i (rows)"),
    ({"rank": None}, "column 'rank' is missing"),
])
def test_rows_other_than_declared_are_refused_before_they_reach_the_disk(tmp_path, change, problem):
    rows = {k: v for k, v in {**batch(["a", "b"], 0), **change}.items() if v is not None}
    assert row_problem(rows) == problem
    with pytest.raises(ValueError, match=re.escape(problem)):
        LatentExporter(str(tmp_path), "npz").save_batch(0, 0, rows)
    assert not list(tmp_path.rglob("*.npz"))
