"""A run directory that protects itself: nothing lost, mixed or duplicated, whatever the user or the machine does.

Each CLI case runs `python -m glo.run` as a subprocess and asserts the one-line message, the exit code
and the state the directory is left in.
"""
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from glo import GloError
from glo.latents import LatentDataset, load_latents
from glo.layout import ROWS_VERSION
from tests.conftest import FAST, ROOT, run_config, run_glo

RUN = [*FAST, "loss=l2", "lr=0.1"]  # what the session's finished_run was made with


def one_error(p: subprocess.CompletedProcess, prog: str = "glo") -> str:
    errors = [line for line in p.stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return errors[0]


def files(run: Path) -> dict[str, bytes]:
    """Every result file's bytes (TensorBoard and Hydra's own files aside)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and ".hydra" not in p.parts and "events.out" not in p.name and p.name != ".lock"}


@pytest.fixture
def copy_of(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


def fingerprint_of(*overrides: str, precision: str = "fp32") -> dict:
    from glo.store.rundir import fingerprint

    cfg = run_config(*RUN, *overrides)
    return fingerprint(cfg, ["a", "b", "c"][: cfg.data.limit], precision)


@pytest.mark.parametrize("override,key", [
    ("lr=0.05", "lr"), ("max_steps=9", "max_steps"), ("data.size=32", "data.size"), ("data.limit=2", "data.ids"),
    ("mask=boxes", "mask._target_"), ("seed=1", "seed"), ("loss=l1", "loss.l1"), ("betas=[0.5,0.9]", "betas"),
    ("vae=standin", "vae.weights_sha256"), ("tile_size=64", "tile_size"), ("rel_tol=0.01", "rel_tol"),
    ("channel_lr=[2,1,1,1]", "channel_lr"),
])
def test_every_setting_that_changes_results_is_in_the_fingerprint(override, key):
    base, other = fingerprint_of(), fingerprint_of(override)
    assert base.get(key) != other.get(key)


@pytest.mark.parametrize("override", ["report=false", "batch_size=1", "num_workers=1", "export.format=hdf5",
                                      "image_every_n_batches=0", "device=cpu", "resume=restart", "channels_last=true",
                                      "data.on_error=skip", "data.cache_in_memory=true", "vae.path=/elsewhere"])
def test_settings_that_do_not_change_results_are_not_in_the_fingerprint(override):
    base = ["data=bsds500"] if override.startswith("data.") else []  # the sample photos have neither setting
    assert fingerprint_of(*base) == fingerprint_of(*base, override)


def test_the_vae_weights_are_identified_by_their_content_wherever_they_are(tmp_path):
    """A weights file by its bytes whatever its name; a diffusers directory by its config and weights, a whole
    pipeline's by its vae/ (so a run may move from one to the other); any other weights, another digest."""
    def digest(path: Path, vae: str = "sd_file") -> str:
        return fingerprint_of(f"vae={vae}", f"vae.path={path}")["vae.weights_sha256"]

    files = {"a.safetensors": 0.0, "moved/b.safetensors": 0.0, "c.safetensors": 1.0, "d/vae/w.safetensors": 0.0,
             "e/w.safetensors": 0.0, "f/w.safetensors": 1.0, "g/w.safetensors": 0.0, "g/vae/w.safetensors": 1.0}
    for name, value in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.full((2,), value)}, tmp_path / name)
    for folder in ("d/vae", "e", "f", "g", "g/vae"):
        (tmp_path / folder / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    (tmp_path / "d" / "model_index.json").write_text("{}")  # the pipeline's, not the VAE's
    a, b, c = (digest(tmp_path / name) for name in ("a.safetensors", "moved/b.safetensors", "c.safetensors"))
    assert a == b != c and len(a) == 64
    d, e, f, g = (digest(tmp_path / name, "sd15") for name in ("d", "e", "f", "g"))
    assert d == e == g != f and len(d) == 64 and d != a  # g is a VAE directory itself: its own vae/ is not read


def test_the_fingerprint_holds_which_images_not_only_how_many():
    from glo.store.rundir import fingerprint

    cfg = run_config(*RUN)
    ab, ac = fingerprint(cfg, ["a", "b"], "fp32"), fingerprint(cfg, ["a", "c"], "fp32")
    assert ab["data.ids"] != ac["data.ids"] and ab["data.ids"].startswith("2 images, sha256 ")
    assert not [k for k in ab if k.startswith("mask.files")]  # mask files are checked row by row instead
    assert ab["rows_version"] == ROWS_VERSION  # the key older directories were written with


def test_a_hub_vae_is_identified_by_the_weights_in_the_cache_as_if_given_by_path(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    (snapshot / "vae").mkdir(parents=True)
    (snapshot / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    save_file({"w": torch.zeros(2)}, snapshot / "vae" / "w.safetensors")
    asked = []

    def cache(repo: str, name: str) -> str | None:
        asked.append((repo, name))
        return str(snapshot / name) if repo == "stable-diffusion-v1-5/stable-diffusion-v1-5" else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cache)
    cached = fingerprint_of("vae=sd15")["vae.weights_sha256"]
    assert asked == [("stable-diffusion-v1-5/stable-diffusion-v1-5", "vae/config.json")]
    assert cached == fingerprint_of("vae=sd15", f"vae.path={snapshot}")["vae.weights_sha256"] and len(cached) == 64
    assert fingerprint_of("vae=sd15", "vae.pretrained=other/model")["vae.weights_sha256"] is None  # not cached
    fingerprint_of("vae=sd_vae_ft_mse")  # a VAE repository: its config is at the top
    assert asked[-1] == ("stabilityai/sd-vae-ft-mse", "config.json")


def test_the_precision_used_is_in_the_fingerprint():
    assert fingerprint_of()["precision"] == "fp32" and fingerprint_of(precision="bf16")["precision"] == "bf16"
    # an fp16 directory whose fingerprint lacks the key holds unscaled, unmoved latents: refused
    assert fingerprint_of(precision="fp16")["fp16_grad_scale"] == 2**16 and "fp16_grad_scale" not in fingerprint_of()


@pytest.mark.parametrize("override,named", [
    ("lr=0.05", "lr: 0.1 -> 0.05"),
    ("max_steps=9", "max_steps: 8 -> 9"),
    ("data.size=32", "data.size: 64 -> 32"),
])
def test_rerun_with_other_settings_is_refused_and_changes_nothing(copy_of, override, named):
    before = files(copy_of)
    p = run_glo(*RUN, override, f"hydra.run.dir={copy_of}")
    assert p.returncode == 1
    line = one_error(p)
    assert "made with other settings" in line and named in line and "resume=restart" in line, line
    assert files(copy_of) == before
    if override in ("max_steps=9", "data.size=32"):  # these once broke the directory for good
        again = run_glo(*RUN, "report=false", f"hydra.run.dir={copy_of}")
        assert again.returncode == 0, again.stderr[-2000:]


def test_another_data_folder_is_refused(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (64, 64), "red" if name == "a" else "blue").save(tmp_path / name / "x.png")
    run = tmp_path / "run"
    args = ["vae=tiny_random", "data=folder", "data.size=64", "max_steps=2", "precision=fp32", "report=false",
            f"hydra.run.dir={run}"]
    assert run_glo(*args, f"data.path={tmp_path / 'a'}").returncode == 0
    p = run_glo(*args, f"data.path={tmp_path / 'b'}")
    assert p.returncode == 1 and f"data.path: '{tmp_path / 'a'}' -> '{tmp_path / 'b'}'" in one_error(p)
    assert list(load_latents(run / "latents.npz")["sources"]) == [str(tmp_path / "a" / "x.png")]


def test_an_image_changed_since_its_row_was_made_is_computed_again(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in (("a", "red"), ("b", "blue"), ("c", "green")):
        Image.new("RGB", (64, 64), colour).save(photos / f"{name}.png")
    run = tmp_path / "run"
    args = ["vae=tiny_random", "data=folder", f"data.path={photos}", "data.size=64", "max_steps=2", "precision=fp32",
            "report=false", "batch_size=1", f"hydra.run.dir={run}"]
    assert run_glo(*args).returncode == 0
    before = load_latents(run / "latents.npz")
    Image.new("RGB", (64, 64), "white").save(photos / "b.png")  # edited in place: same name, other pixels
    p = run_glo(*args)
    log = p.stdout + p.stderr
    assert p.returncode == 0 and "image 'b' has changed since" in log and "1 of 3 images to do" in log, log[-2000:]
    after = load_latents(run / "latents.npz")
    assert list(after["source_sha256"]) == [hashlib.sha256((photos / f"{n}.png").read_bytes()).hexdigest()
                                            for n in "abc"]
    assert not np.array_equal(after["latents"][1], before["latents"][1])
    assert np.array_equal(after["latents"][[0, 2]], before["latents"][[0, 2]])  # the others were kept, not redone


def test_resume_restart_starts_over_with_the_new_settings(copy_of):
    old = load_latents(copy_of / "latents.npz")
    report = {"metrics.csv", "report.md"} | {q.name for q in copy_of.glob("*.png")}
    assert "gain_vs_drift.png" in report
    p = run_glo(*RUN, "lr=0.05", "resume=restart", "report=false", f"hydra.run.dir={copy_of}")
    assert p.returncode == 0, p.stderr[-2000:]
    new = load_latents(copy_of / "latents.npz")
    assert list(new["ids"]) == list(old["ids"]) and not np.array_equal(new["latents"], old["latents"])
    assert json.loads((copy_of / "metadata.json").read_text())["config"]["lr"] == 0.05
    assert json.loads((copy_of / "fingerprint.json").read_text())["lr"] == 0.05
    assert not {q.name for q in copy_of.iterdir()} & report  # every file of the old report went with the old results


def test_results_from_a_glo_with_other_row_columns_are_refused_before_any_work(copy_of):
    stored = json.loads((copy_of / "fingerprint.json").read_text())
    del stored["rows_version"]  # as a glo before the `rank` column wrote it
    (copy_of / "fingerprint.json").write_text(json.dumps(stored))
    before = files(copy_of)
    p = run_glo(*RUN, f"hydra.run.dir={copy_of}")
    assert p.returncode == 1 and f"rows_version: None -> {ROWS_VERSION}" in one_error(p) and "resume=restart" in one_error(p)
    assert files(copy_of) == before


def test_a_run_made_where_auto_chose_another_precision_says_which_resumes_it(copy_of):
    """A killed run resumed on another machine: precision=auto chose bf16 there (native bf16) and fp32 here. The
    rows must not mix the two, so it is refused, and the line names the one setting that resumes it as made."""
    stored = json.loads((copy_of / "fingerprint.json").read_text())
    (copy_of / "fingerprint.json").write_text(json.dumps({**stored, "precision": "bf16"}))
    before = files(copy_of)
    p = run_glo(*RUN, f"hydra.run.dir={copy_of}")
    line = one_error(p)
    assert p.returncode == 1 and "precision: 'bf16' -> 'fp32'" in line, line
    assert "run with precision=bf16 to resume it as it was made" in line and files(copy_of) == before
    again = run_glo(*RUN, "precision=bf16", f"hydra.run.dir={copy_of}")  # nothing left to do: no bf16 pass runs
    assert again.returncode == 0 and "0 of 3 images to do (3 already exported)" in again.stdout, again.stderr[-2000:]


def results(run: Path) -> None:
    """What a finished batch leaves: a rank's manifest."""
    (run / "shards").mkdir()
    (run / "shards" / "manifest-0.json").write_text("{}")


def test_a_directory_without_results_takes_the_new_settings(tmp_path):
    """A run stopped before its first batch (out of memory, a VAE that does not fit the settings) kept nothing that
    could be mixed: the corrected command may use the same directory."""
    from glo.store.rundir import claim

    claim(tmp_path, {"a": 1}, "auto")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "0000-ab12.npz").write_text("x")  # a shard written, its manifest not yet: not a result
    claim(tmp_path, {"a": 2}, "auto")
    assert json.loads((tmp_path / "fingerprint.json").read_text()) == {"a": 2}
    (tmp_path / "fingerprint.json").write_text("{")
    claim(tmp_path, {"a": 3}, "auto")
    assert json.loads((tmp_path / "fingerprint.json").read_text()) == {"a": 3}


def test_the_precision_hint_is_only_given_where_the_precision_alone_differs(tmp_path):
    from glo.store.rundir import claim

    claim(tmp_path, fingerprint_of(), "auto")  # made where auto chose fp32
    results(tmp_path)
    claim(tmp_path, fingerprint_of("precision=auto"), "auto")  # auto and a forced fp32 are the same rows: resumes
    for made, now in ((fingerprint_of(), fingerprint_of("lr=0.05", precision="bf16")),
                      (fingerprint_of(precision="fp16"), fingerprint_of(precision="bf16"))):
        (tmp_path / "fingerprint.json").write_text(json.dumps(made))
        with pytest.raises(GloError) as e:
            claim(tmp_path, now, "auto")
        hint = f"run with precision={made['precision']} to resume it as it was made"
        assert (hint in str(e.value)) == ("lr" not in str(e.value)), str(e.value)


def test_a_refusal_names_what_differs_even_a_setting_only_one_side_has(tmp_path):
    from glo.store.rundir import claim

    made = {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    claim(tmp_path, made, "auto")
    results(tmp_path)
    stored = (tmp_path / "fingerprint.json").read_bytes()
    assert json.loads(stored) == made
    claim(tmp_path, dict(made), "auto")  # the same settings resume
    for now, named in (({**made, "f": 6}, "f: None -> 6"), ({"b": 2, "c": 3, "d": 4, "e": 5}, "a: 1 -> None"),
                       ({**made, "a": 0, "b": 0, "c": 0, "d": 0}, "a: 1 -> 0; b: 2 -> 0; c: 3 -> 0; d: 4 -> 0)"),
                       ({k: 0 for k in made}, "a: 1 -> 0; b: 2 -> 0; c: 3 -> 0; d: 4 -> 0 and 1 more)")):
        with pytest.raises(GloError) as e:
            claim(tmp_path, now, "auto")
        assert str(e.value).startswith(f"{tmp_path}: made with other settings (") and named in str(e.value), e.value
        assert "resume=restart" in str(e.value) and (tmp_path / "fingerprint.json").read_bytes() == stored


@pytest.mark.parametrize("result", ["shards/manifest-0.json", "latents.npz", "latents.h5"])
def test_results_without_a_readable_fingerprint_are_refused_and_restart_removes_only_results(tmp_path, result):
    from glo.store.rundir import claim

    kept = [".hydra/config.yaml", ".lock", "notes.txt"]  # Hydra's, the lock, and the user's own files
    for name in [*kept, result, "shards/a.npz", "report.md", "grids.png", "events.out.tfevents.1.host"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    for resume in ("auto", "restart"):
        with pytest.raises(GloError, match="but no fingerprint.json, so glo did not make this directory"):
            claim(tmp_path, {"a": 1}, resume)
    (tmp_path / "fingerprint.json").write_text("{")
    with pytest.raises(GloError, match="fingerprint.json: unreadable .*resume=restart"):
        claim(tmp_path, {"a": 1}, "auto")
    claim(tmp_path, {"a": 2}, "restart")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        [*kept, "fingerprint.json"])
    assert json.loads((tmp_path / "fingerprint.json").read_text()) == {"a": 2}


@pytest.mark.parametrize("resume", ["auto", "restart"])
def test_a_directory_glo_did_not_make_is_left_untouched(tmp_path, resume):
    """A user's report.md and metadata.json (an empty hydra.run.dir in a script meant the working directory) are
    neither overwritten nor deleted, whatever resume says."""
    from glo.store.rundir import claim

    for name in ("report.md", "metadata.json", "shards/notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("mine")
    with pytest.raises(GloError, match=r"holds \S+ but no fingerprint.json, so glo did not make this directory"):
        claim(tmp_path, {"a": 1}, resume)
    assert all((tmp_path / n).read_text() == "mine" for n in ("report.md", "metadata.json", "shards/notes.txt"))
    assert not (tmp_path / "fingerprint.json").exists()


def test_an_empty_run_directory_is_one_line(tmp_path):
    p = run_glo(*RUN, "hydra.run.dir=")
    assert p.returncode == 1 and one_error(p) == "glo: error: hydra.run.dir is empty; name the directory for the results"


def test_a_dead_writers_temporary_files_are_removed_on_resume(tmp_path):
    """kill -9 during a merge leaves `.latents.h5.<pid>.tmp` (up to the dataset's size); the next process to hold
    the lock removes it, and every other temporary file a dead writer left."""
    from glo.store.rundir import claim

    claim(tmp_path, {"a": 1}, "auto")
    left = [tmp_path / ".latents.h5.123.tmp", tmp_path / "shards" / ".shard-00000000-ab.npz.123.tmp"]
    for f in left:
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"x" * 100)
    (tmp_path / "shards" / "manifest-0.json").write_text("{}")
    claim(tmp_path, {"a": 1}, "auto")
    assert not any(f.exists() for f in left) and (tmp_path / "shards" / "manifest-0.json").is_file()


def test_results_without_a_fingerprint_are_refused(copy_of):
    (copy_of / "fingerprint.json").unlink()
    p = run_glo(*RUN, f"hydra.run.dir={copy_of}")
    assert p.returncode == 1 and "no fingerprint.json" in one_error(p)


def test_a_second_process_on_the_same_directory_stops_at_once(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running glo.run holds it
        p = run_glo(*RUN, f"hydra.run.dir={run}")
    assert p.returncode == 1 and "another glo process is working in this directory" in one_error(p)
    assert not (run / "shards").exists() and not (run / "fingerprint.json").exists()
    assert run_glo(*RUN, "report=false", f"hydra.run.dir={run}").returncode == 0  # released with the holder


def test_two_glo_locks_on_one_directory_exclude_each_other_until_the_first_is_released(tmp_path):
    """Both sides use glo's own lock, so a shared lock (two holders at once) fails here, which a test holding an
    exclusive lock from outside could not show."""
    from glo.store.rundir import lock

    held = lock(tmp_path / "run")
    with pytest.raises(GloError, match=r"run: another glo process is working in this directory; wait for it"):
        lock(tmp_path / "run")
    held.close()
    lock(tmp_path / "run").close()


@pytest.mark.parametrize("damage", ["lost", "truncated"])
def test_a_lost_or_damaged_shard_is_recomputed_and_the_result_is_identical(copy_of, damage):
    reference = load_latents(copy_of / "latents.npz")
    shards = sorted((copy_of / "shards").glob("shard-*.npz"))
    assert len(shards) == 2
    if damage == "lost":
        shards[0].unlink()
    else:
        shards[0].write_bytes(shards[0].read_bytes()[:300])
    p = run_glo(*RUN, "report=false", f"hydra.run.dir={copy_of}")
    assert p.returncode == 0, p.stderr[-2000:]
    log = p.stdout + p.stderr
    assert f"{shards[0].name}: {'missing' if damage == 'lost' else 'damaged'}" in log
    assert "computed again" in log and "2 of 3 images to do (1 already exported)" in log
    again = load_latents(copy_of / "latents.npz")
    assert list(again["ids"]) == list(reference["ids"])  # every image exactly once, in dataset order
    for key in ("latents", "initial_latents", "steps", "final_loss"):
        assert np.array_equal(again[key], reference[key]), key
    manifest = json.loads((copy_of / "shards" / "manifest-0.json").read_text())
    assert sorted(i for ids in manifest.values() for i in ids) == sorted(reference["ids"])
    assert sorted(p.name for p in (copy_of / "shards").glob("shard-*.npz")) == sorted(manifest)


def test_changing_the_export_format_removes_the_other_format(copy_of):
    npz = load_latents(copy_of / "latents.npz")
    p = run_glo(*RUN, "export.format=hdf5", f"hydra.run.dir={copy_of}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert not (copy_of / "latents.npz").exists()
    h5 = load_latents(copy_of / "latents.h5")
    assert np.array_equal(h5["latents"], npz["latents"]) and list(h5["ids"]) == list(npz["ids"])


ARGS = ["vae=tiny_random", "data.limit=6", "data.size=64", "max_steps=40", "rel_tol=0", "batch_size=2", "report=false",
        "precision=fp32"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    p = run_glo(*ARGS, f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr[-2000:]
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_killed_or_terminated_run_resumes_to_bitwise_the_same_dataset(uninterrupted, tmp_path, sig):
    killed = tmp_path / "killed"
    # a shell's background job (CI's, nohup's) inherits SIGINT ignored; give the run what a terminal gives it
    proc = subprocess.Popen([sys.executable, "-m", "glo.run", *ARGS, f"hydra.run.dir={killed}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    manifest = killed / "shards" / "manifest-0.json"
    deadline = time.time() + 300
    while not manifest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    done = json.loads(manifest.read_text())
    safe = sum(len(ids) for ids in done.values())
    assert 1 <= safe < 6, "the signal came too late to test anything"
    said = {signal.SIGTERM: (143, "by SIGTERM after the current batch"),  # finished and written, then one line
            signal.SIGINT: (130, "by Ctrl+C, the batch in flight is lost")}  # Ctrl+C: at once, and one line
    if sig in said:
        code, how = said[sig]
        assert proc.returncode == code and "Traceback" not in stderr, stderr[-2000:]
        assert [ln for ln in stderr.splitlines() if "SIGTERM" in ln or ln.startswith("glo: error:")] == [
            f"glo: error: stopped {how}; {safe} image(s) are safe in {killed / 'shards'}: run the same command again "
            "to resume"]
    if sig == signal.SIGTERM:
        assert safe == 4  # the first batch's manifest started the signal; the second batch was still finished
    assert not (killed / "latents.npz").exists() and not (killed / "summary.json").exists()

    p = run_glo(*ARGS, f"hydra.run.dir={killed}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "already exported" in p.stdout + p.stderr
    a, b = np.load(uninterrupted / "latents.npz"), np.load(killed / "latents.npz")
    assert list(b["ids"]) == list(a["ids"])  # every image exactly once, in order
    for key in ("latents", "initial_latents", "steps", "final_loss"):
        assert np.array_equal(a[key], b[key]), key


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill a disk")
    try:
        p = run_glo(*RUN, "data.limit=6", "batch_size=1", f"hydra.run.dir={disk}/run")
        assert p.returncode == 1
        assert "No space left on device" in one_error(p)
        for shard in (disk / "run" / "shards").glob("*.npz"):  # whatever exists is whole
            load_latents(shard)
        assert not list(disk.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)])


def test_an_immutable_shards_directory_is_one_line(tmp_path):
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(run / "shards")], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here (needs root and a supporting filesystem)")
    try:
        p = run_glo(*RUN, f"hydra.run.dir={run}")
        assert p.returncode == 1
        line = one_error(p)
        assert str(run / "shards") in line and "Operation not permitted" in line
    finally:
        subprocess.run(["chattr", "-i", str(run / "shards")])


def test_paths_are_stored_absolute_and_evaluate_works_from_anywhere(tmp_path):
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "photos" / "x.png")
    relative = os.path.relpath(tmp_path / "photos", ROOT)
    run = tmp_path / "run"
    p = run_glo("vae=tiny_random", "data=folder", f"data.path={relative}", "data.size=64", "max_steps=2",
                "precision=fp32", "report=false", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-2000:]
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["config"]["data"]["path"] == str(tmp_path / "photos")
    assert list(load_latents(run / "latents.npz")["sources"]) == [str(tmp_path / "photos" / "x.png")]
    e = subprocess.run([sys.executable, "-m", "glo.evaluate", str(run)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert e.returncode == 0, e.stderr[-2000:]
    assert (run / "metrics.csv").is_file()


def test_home_in_a_path_is_expanded(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from glo.run import absolute_paths

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = OmegaConf.create({"data": {"path": "~/photos"}, "mask": {"path": None}, "vae": {"path": "rel"}})
    absolute_paths(cfg)
    assert cfg.data.path == str(tmp_path / "photos") and cfg.vae.path == os.path.abspath("rel")


def test_foreign_latents_files_name_the_missing_array(tmp_path):
    np.savez(tmp_path / "other.npz", latents=np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(GloError, match=r"other\.npz: no 'ids' array .* it has latents"):
        load_latents(tmp_path / "other.npz")
    np.savez(tmp_path / "short.npz", ids=np.array(["a", "b"]), latents=np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(GloError, match=r"short\.npz: no 'initial_latents' array"):
        LatentDataset(tmp_path / "short.npz")
    np.savez(tmp_path / "rows.npz", ids=np.array(["a", "b"]), latents=np.zeros((3, 4, 8, 8), np.float32))
    with pytest.raises(GloError, match=r"rows\.npz: 'latents' has 3 rows, 'ids' has 2"):
        load_latents(tmp_path / "rows.npz")
    with h5py.File(tmp_path / "grouped.h5", "w") as f:
        f.create_group("latents").create_dataset("z", data=np.zeros(3))
    with pytest.raises(GloError, match=r"grouped\.h5: 'latents' is an HDF5 group"):
        LatentDataset(tmp_path / "grouped.h5")
