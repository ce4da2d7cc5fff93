"""The dataset on disk: exact round trip, atomic files, one-line errors for damaged ones."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from glo import GloError
from glo.export import LatentDataset, LatentExporter, load_latents, open_latents


def batch(ids, seed):
    rng = np.random.default_rng(seed)
    n = len(ids)
    curves = rng.random((n, 5)).astype(np.float32)
    curves[0, 3:] = np.nan
    return {
        "ids": np.array(ids), "latents": rng.standard_normal((n, 4, 8, 8)).astype(np.float32),
        "initial_latents": rng.standard_normal((n, 4, 8, 8)).astype(np.float32),
        "steps": np.array([3] + [5] * (n - 1)), "initial_loss": np.full(n, 0.5, np.float32),
        "final_loss": np.array([0.4] + [0.6] * (n - 1), np.float32),
        "psnr_initial": np.full(n, 20.0, np.float32), "psnr_final": np.array([21.5] * (n - 1) + [19.5], np.float32),
        "ssim_initial": np.full(n, 0.5, np.float32), "ssim_final": np.full(n, 0.6, np.float32),
        "converged": np.array([True] + [False] * (n - 1)), "nonfinite": np.zeros(n, bool),
        "loss_curves": curves, "seconds": np.full(n, 0.25),
    }


def export(out, batches, format="npz"):
    exporter = LatentExporter(str(out), format)
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


def test_damaged_or_missing_file_is_named(tmp_path):
    export(tmp_path, [batch(["a"], 0)])
    path = tmp_path / "latents.npz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(GloError, match=r"latents\.npz: not a readable latents file"):
        load_latents(path)
    with pytest.raises(GloError, match=r"nothing\.npz: no such file"):
        LatentDataset(tmp_path / "nothing.npz")


def test_a_failed_write_leaves_no_file_that_looks_complete(tmp_path, monkeypatch):
    exporter = LatentExporter(str(tmp_path), "npz")

    def broken_savez(f, **arrays):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        exporter.on_predict_batch_end(SimpleNamespace(global_rank=0), None, batch(["a"], 0), (None, {"index": [0]}), 0)
    assert list(tmp_path.rglob("*")) == [tmp_path / "shards"]


def test_hdf5_holds_the_same_arrays_as_npz_and_reads_lazily(tmp_path):
    batches = [batch(["a", "b"], 0), batch(["c"], 1)]
    export(tmp_path / "npz", batches)
    export(tmp_path / "h5", batches, format="hdf5")
    a, b = load_latents(tmp_path / "npz" / "latents.npz"), load_latents(tmp_path / "h5" / "latents.h5")
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=key == "loss_curves"), key
    for path in (tmp_path / "npz" / "latents.npz", tmp_path / "h5" / "latents.h5"):
        lazy = open_latents(path)["latents"]
        assert not isinstance(lazy, np.ndarray) or isinstance(lazy, np.memmap)  # mapped or chunked, not loaded
        ds = LatentDataset(path)
        assert ds.ids == ["a", "b", "c"] and torch.equal(ds[2]["latent"], torch.from_numpy(a["latents"][2]))


def test_unknown_export_format_is_rejected(tmp_path):
    with pytest.raises(GloError, match="export.format=zarr"):
        LatentExporter(str(tmp_path), "zarr")
