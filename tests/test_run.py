"""`python -m glo.run` as a user types it: outputs, contract keys, multirun, resume, bad input."""
import contextlib
import json

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf.errors import ConfigAttributeError
from PIL import Image

import glo.app.config
import glo.app.module
import glo.method.losses
import glo.model.hardware
import glo.model.memory
import glo.run
from glo import GloError
from glo.app.cli import (
    COMMAND_LINE_ERRORS,
    NoUnreadKeys,
    hydra_main,
    one_line,
    one_line_errors,
)
from glo.app.config import built
from glo.method.settings import Settings
from glo.model.hardware import Speed
from glo.run import validate
from tests.conftest import FAST, as_in_hydra_main, run_config, run_glo

SUMMARY_KEYS = {"num_images", "psnr_initial_mean", "psnr_final_mean", "psnr_gain_mean", "images_improved",
                "steps_mean", "seconds_total", "images_per_second"}
ARRAYS = {"ids", "latents", "initial_latents", "steps", "initial_loss", "final_loss", "psnr_initial", "psnr_final",
          "converged", "loss_curves"}


def test_run_writes_the_dataset_and_resumes_without_redoing(finished_run):
    out = finished_run
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["num_images"] == 3 and summary["psnr_gain_mean"] > 0 and summary["images_improved"] == 3
    a = np.load(out / "latents.npz")
    assert ARRAYS <= set(a.files)
    assert a["latents"].shape == (3, 4, 8, 8) and a["latents"].dtype == np.float32
    assert a["loss_curves"].shape == (3, 8) and a["converged"].dtype == bool
    assert list(a["ids"]) == ["astronaut", "coffee", "chelsea"]
    assert not np.array_equal(a["latents"], a["initial_latents"])
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["config"]["lr"] == 0.1 and meta["vae"]["scaling_factor"] == pytest.approx(0.18215)
    assert meta["image_size"] == 64 and meta["environment"]["torch"].startswith("2.13.0")
    assert {"start_time", "end_time"} <= meta.keys()
    assert meta["precision"] == {"requested": "fp32", "used": "fp32", "reason": "forced by precision=fp32"}
    assert meta["machine"]["cpu_capability"] and "cpu_native_bf16" in meta["machine"]
    assert np.array_equal(a["passes"], a["steps"] + 0.5) and summary["passes_mean"] == pytest.approx(8.5)
    assert list(out.glob("events.out.tfevents.*"))
    shards = sorted((out / "shards").glob("*.npz"))
    assert len(shards) == 2

    events = sorted(out.glob("events.out.tfevents.*"))
    again = run_glo(*FAST, "loss=l2", "lr=0.1", "logger=none", f"hydra.run.dir={out}")  # the logger is not a result
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted((out / "shards").glob("*.npz")) == shards  # nothing was redone
    assert sorted(out.glob("events.out.tfevents.*")) == events  # logger=none: the report wrote no event file
    b = np.load(out / "latents.npz")
    assert all(np.array_equal(a[k], b[k]) for k in ("ids", "latents", "steps"))


def test_a_run_where_most_images_met_a_non_finite_loss_says_so_at_the_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(glo.method.losses.PixelLoss, "forward", lambda self, pred, target, weight=None:
                        (pred - target).flatten(1).mean(1) * float("nan"))
    glo.run.run(as_in_hydra_main(monkeypatch, tmp_path, *FAST, "logger=none", "report=false"))
    err = capsys.readouterr().err
    assert "glo: warning: 3 of 3 images met a non-finite loss and kept their best latent" in err


def test_a_resume_that_computes_removes_the_dataset_until_its_merge(tmp_path, monkeypatch, capsys):
    """A shard lost after the merge is computed again; the run dies before merging: no latents.npz, metadata.json,
    summary.json or hf/ of the earlier merge is left to disagree with the shards. The next run merges all again."""
    args = [*FAST, "data.limit=2", "batch_size=1", "logger=none", "report=false"]
    glo.run.run(as_in_hydra_main(monkeypatch, tmp_path, *args))
    (tmp_path / "hf").mkdir()  # glo.to_hf's default output, made from this merge
    first = np.load(tmp_path / "latents.npz")["latents"]
    sorted((tmp_path / "shards").glob("shard-*.npz"))[0].unlink()

    def dies(*a, **k):
        raise GloError("killed")

    monkeypatch.setattr(glo.app.module, "fit_batch", dies)
    with pytest.raises(GloError, match="killed"):
        glo.run.run(as_in_hydra_main(monkeypatch, tmp_path, *args))
    assert not [n for n in ("latents.npz", "metadata.json", "summary.json", "hf") if (tmp_path / n).exists()]
    monkeypatch.undo()
    glo.run.run(as_in_hydra_main(monkeypatch, tmp_path, *args))
    assert np.array_equal(np.load(tmp_path / "latents.npz")["latents"], first)


def test_same_seed_and_config_give_bitwise_identical_latents(finished_run, tmp_path):
    p = run_glo(*FAST, "loss=l2", "lr=0.1", "report=false", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = np.load(finished_run / "latents.npz"), np.load(tmp_path / "latents.npz")
    assert np.array_equal(a["latents"], b["latents"]) and np.array_equal(a["loss_curves"], b["loss_curves"],
                                                                         equal_nan=True)


def test_multirun_gives_each_job_its_own_directory_and_compare_ranks_them(tmp_path):
    p = run_glo("--multirun", "vae=tiny_random", "lr=0.001,0.1", "data.limit=1", "data.size=64", "max_steps=4", "report=false", "precision=fp32",
                f"hydra.sweep.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    lrs = [json.loads((tmp_path / str(k) / "metadata.json").read_text())["config"]["lr"] for k in (0, 1)]
    assert lrs == [0.001, 0.1]
    gains = [json.loads((tmp_path / str(k) / "summary.json").read_text())["psnr_gain_mean"] for k in (0, 1)]
    assert gains[1] > gains[0]  # 4 steps at lr 0.1 go further than at lr 0.001
    c = run_glo(str(tmp_path), module="glo.compare")
    assert c.returncode == 0, c.stderr
    table = (tmp_path / "compare.md").read_text().splitlines()
    assert "lr=0.1" in table[2] and "lr=0.001" in table[3]  # sorted by gain, best first
    assert "lr=0.1" in c.stdout


def bad_folder(tmp_path, kind):
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "corrupt":
        Image.new("RGB", (64, 64), "red").save(folder / "good.png")
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return folder


@pytest.mark.parametrize("override,message", [
    ("lr=0", "lr=0"),
    ("lr=fast", "lr=fast: must be a finite number"),
    ("lr=inf", "lr=inf: must be a finite number"),
    ("lr=1e400", "lr=inf: must be a finite number"),
    ("eps=inf", "eps=inf: must be a finite number"),
    ("anchor=inf", "anchor=inf: must be a finite number"),
    ("channel_lr=[inf,1,1,1]", "channel_lr[0]=inf: must be a finite number"),
    ("betas=[nan,0.9]", "betas[0]=nan: must be a finite number"),
    ("max_steps=0", "max_steps=0: must be >= 1"),
    ("max_steps=2.5", "max_steps=2.5: must be an integer"),
    ("rel_tol=-1", "rel_tol=-1: must be >= 0"),
    ("precision=fp8", "precision=fp8: must be one of auto, fp32, bf16, fp16"),
    ("lr=-0.1", "lr=-0.1: must be > 0"),
    ("resume=maybe", "resume=maybe: must be one of auto, restart"),
    ("vae.path=2024", "vae.path=2024: read as a number, not a path; write the folder with a slash (vae.path=./NAME)"),
    ("batch_size=2.5", "batch_size=2.5: must be an integer"),
    ("batch_size=true", "batch_size=True: must be an integer"),
    ("data.limit=0", "data.limit=0: must be >= 1, or null"),
    ("seed=4294967296", "seed=4294967296: must be < 4294967296"),
    ("device=tpu", "device=tpu: must be one of auto, cpu, cuda, mps"),
    ("channel_lr=[1,-1]", "channel_lr[1]=-1: must be >= 0"),
    ("channel_lr=[]", "channel_lr=(): must hold at least 1, or null"),
    ("optim=lbfgs channel_lr=[1,1,1,1]", "channel_lr: optim=lbfgs takes no Adam steps"),
    ("optim=gradfree mask=boxes mask.known_only=true",
     "optim=gradfree has no pixel loss to restrict: use optim=adam with mask.known_only=true"),
])
def test_a_bad_setting_is_refused_by_validate_before_anything_is_built(override, message, capsys, monkeypatch, tmp_path):
    """In process: validate() is run()'s first call; the cases below run all of run() with nothing written."""
    with pytest.raises(SystemExit), one_line_errors("glo"):  # as glo.run's main wraps run()
        validate(as_in_hydra_main(monkeypatch, tmp_path, *override.split()))
    err = capsys.readouterr().err
    assert err.startswith("glo: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("overrides", [["data.limit=1"], ["seed=4294967295"], ["optim=gradfree", "mask=boxes"],
                                       ["mask=boxes", "mask.known_only=true"], ["device=cpu", "data.limit=null"]])
def test_validate_allows_the_edges_and_returns_the_settings_and_speed_switches(overrides, monkeypatch, tmp_path):
    settings, speed = validate(as_in_hydra_main(monkeypatch, tmp_path, *overrides, "tile_size=64"))
    assert speed == Speed(channels_last=False, checkpointing=False, tile_size=64)
    assert settings == built(Settings, run_config(*overrides))


@pytest.mark.parametrize("overrides,message", [
    (["data.size=60"], "data.size=60: must be a multiple of 8"),
    (["data=folder", "data.path=MISSING"], "no such directory"),
    (["data=folder", "data.path=EMPTY"], "no image files"),
    (["data=folder", "data.path=CORRUPT"], "broken.jpg: not a readable image"),
    (["data=folder", "data.path=CORRUPT"], "; replace or remove it, or run with data.on_error=skip to leave such files out"),
    (["data=folder"], "data.path: must be set"),
    (["mask=folder"], "mask.path: must be set (e.g. mask.path=DIR)"),
    (["vae=sd_file"], "vae.path: must be set (e.g. vae.path=FILE)"),
    (["betas=[2,3]"], "betas[0]=2: must be < 1"),
    (["betas=abc"], "betas=abc: must be a list"),
    (["num_workers=-1"], "num_workers=-1: must be >= 0"),
    (["seed=-1"], "seed=-1: must be >= 0"),
    (["data.limit=abc"], "data.limit=abc: must be an integer, or null"),
    (["data.limit=-1"], "data.limit=-1: must be >= 1, or null"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, overrides, message):
    """In process, as glo.run's main calls run(). A GloError from run() reaches the console as one line in the
    subprocess tests (test_masks' bad masks, fewer images than processes here)."""
    paths = {"MISSING": str(tmp_path / "missing"), "EMPTY": str(bad_folder(tmp_path, "empty")),
             "CORRUPT": str(bad_folder(tmp_path, "corrupt"))}
    overrides = [o.replace(o.split("=")[1], paths.get(o.split("=")[1], o.split("=")[1])) for o in overrides]
    out = tmp_path / "run"
    cfg = as_in_hydra_main(monkeypatch, out, *overrides, "data.size=64" if "data.size=60" not in overrides else "max_steps=2")
    with pytest.raises(SystemExit), one_line_errors("glo"):
        glo.run.run(cfg)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("glo: error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (out / "latents.npz").exists() and not (out / "summary.json").exists()
    assert not (out / "fingerprint.json").exists() and not (out / "shards").exists()


def test_skip_mode_runs_on_and_lists_the_bad_files(tmp_path):
    folder = bad_folder(tmp_path, "corrupt")
    p = run_glo("data=folder", f"data.path={folder}", "data.on_error=skip", "data.size=64", "max_steps=2", "precision=fp32",
                "report=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode == 0, p.stderr[-2000:]
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert [s["source"] for s in meta["skipped"]] == [str(folder / "broken.jpg")]
    assert list(np.load(tmp_path / "run" / "latents.npz")["ids"]) == ["good"]


def test_unknown_loss_is_one_line_listing_the_choices(tmp_path):
    p = run_glo("loss=huber", f"hydra.run.dir={tmp_path}/run")
    errors = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and errors == ["glo: error: loss=huber: there is no loss huber; choose one of l1, l1_l2, l2"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("multirun", [False, True])
def test_unwritable_output_directory_is_one_line(tmp_path, multirun):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    where = f"hydra.sweep.dir={blocker}/sweep" if multirun else f"hydra.run.dir={blocker}/run"
    p = run_glo(*(["-m", "lr=0.1,0.2"] if multirun else []), where)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("glo: error:")]
    assert len(errors) == 1 and f"output directory {blocker}" in errors[0] and "cannot write there" in errors[0]


def test_an_added_key_that_nothing_reads_is_one_line_not_a_run_on_the_defaults(tmp_path):
    p = run_glo(*FAST, "+max_step=50", f"hydra.run.dir={tmp_path}")  # as Hydra's hint for max_step=50 says
    errors = [line for line in p.stderr.splitlines() if line.startswith("glo: error:")]
    assert p.returncode == 1 and len(errors) == 1 and "did you mean max_steps=50?" in errors[0], p.stderr[-2000:]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("module,override,hint", [
    ("glo.run", "max_step=50", "max_step=50: glo has no setting max_step (did you mean max_steps=50?)"),
    ("glo.bench", "repeat=3", "repeat=3: glo has no setting repeat (did you mean repeats=3?)"),
    ("glo.roundtrip", "trip=3", "trip=3: glo has no setting trip (did you mean trips=3?)"),
    ("glo.train_vae", "sed=1", "sed=1: glo has no setting sed (did you mean seed=1?)"),
    ("glo.train_vae", "max_step=9", "max_step=9: glo has no setting max_step (did you mean trainer.max_steps=9?)"),
])
def test_a_mistyped_key_is_one_line_naming_the_nearest_in_every_tool(tmp_path, module, override, hint):
    """Hydra's own message spans several lines and suggests adding the key with `+`, which would change nothing."""
    p = run_glo(override, f"hydra.run.dir={tmp_path}/run", module=module)
    errors = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and len(errors) == 1 and errors[0].startswith(f"glo: error: {hint}"), p.stderr[-2000:]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("override,line", [
    ("data.sise=256", "data.sise=256: glo has no setting data.sise (did you mean data.size=256?); the settings are"),
    ("max_stepz=3", "max_stepz=3: glo has no setting max_stepz (did you mean max_steps=3?); the settings are"),
    ("callbacks.export.fromat=x", "callbacks.export.fromat=x: glo has no setting callbacks.export.fromat (did you "
                                  "mean callbacks.export.format=x?)"),
    ("hydr=1", "hydr=1: glo has no setting hydr; the settings are the keys in conf/ and the README"),  # not Hydra's
    ("mask=boxs", "mask=boxs: there is no mask boxs; choose one of boxes, folder, none, strokes"),
    ("hydra/launcher=foo", "hydra/launcher=foo: there is no hydra/launcher foo; choose one of basic, submitit_local"),
    ("betas=[0.5", "betas=[0.5: cannot read it: no viable alternative at input '[0.5'; See https://hydra.cc/"),
    ("lr=0.1,0.2", "Ambiguous value for argument 'lr=0.1,0.2'; 1. To use it as a list, use key=[value1,value2]; 2."),
    (None, "data.sise: glo has no setting data.sise; the settings are"),  # composed inside a tool (bench's methods)
    # a key that exists one level down: size=512 was answered with tile_size=512, devices=2 with device=2
    ("size=512", "size=512: glo has no setting size (did you mean data.size=512?); the settings are"),
    ("devices=2", "devices=2: glo has no setting devices (did you mean trainer.devices=2?); the settings are"),
    ("format=hdf5", "format=hdf5: glo has no setting format (did you mean export.format=hdf5?); the settings are"),
    ("path=x data=folder mask=folder", "path=x: glo has no setting path (did you mean data.path=x, mask.path=x or "
                                       "vae.path=x?); the settings are"),
    ("path=x data=folder", "path=x: glo has no setting path (did you mean data.path=x or vae.path=x?)"),
    ('size="a=b"', 'size="a=b": glo has no setting size (did you mean data.size="a=b"?)'),  # the value as typed
    ("accelerator=gpu", "accelerator=gpu: glo has no setting accelerator; the settings"),  # ${device}: not offered
    ("target=x", "target=x: glo has no setting target; the settings"),  # data._target_ is not a setting
])
def test_hydra_errors_about_the_command_line_become_one_line(monkeypatch, override, line):
    overrides = override.split() if override else []
    monkeypatch.setattr("sys.argv", ["glo.run", *overrides])
    with pytest.raises(COMMAND_LINE_ERRORS) as e:
        run_config(*(overrides or ["data.sise=1"]), hydra_node=True)
    assert one_line(e.value).startswith(line) and "\n" not in one_line(e.value), one_line(e.value)


@pytest.mark.parametrize("args,line", [
    (["lr=0.1", "logger=null"], "logger=null: a config group cannot be null; choose one of none, tensorboard, or leave "
                                "logger out for its default"),
    (["mask=null"], "mask=null: a config group cannot be null; choose one of boxes, folder, none, strokes, or leave"),
    (["lr=null", "hydra/launcher=null", "logger=none"], None),  # not a glo group, or not null: Hydra's to judge
])
def test_a_config_group_set_to_null_is_one_line_with_its_options(monkeypatch, capsys, args, line):
    """Hydra refuses `group=null` with a ValueError's traceback."""
    monkeypatch.setattr("sys.argv", ["glo.run", *args])
    ran = []
    with pytest.raises(SystemExit) if line else contextlib.nullcontext() as e:
        hydra_main(lambda: ran.append(True))
    assert ran == ([] if line else [True]) and (not line or e.value.code == 1)
    assert capsys.readouterr().err.startswith(f"glo: error: {line}" if line else "")


def test_setting_a_key_under_a_deleted_group_is_one_line_naming_both(monkeypatch):
    monkeypatch.setattr("sys.argv", ["glo.run", "~data", "data.limit=1"])
    with pytest.raises(COMMAND_LINE_ERRORS) as e:
        run_config("~data", "data.limit=1", hydra_node=True)
    assert one_line(e.value) == ("~data data.limit=1: data was deleted, so nothing under it can be set; drop ~data or "
                                 "data.limit=1")


@pytest.mark.parametrize("args,cause", [
    (["~image_every_n_batches"], "Interpolation key 'image_every_n_batches' not found"),
    (["image_every_n_batches=2"], None),
    (["~report"], None),  # deleted, and read nowhere the error names: the error is glo's bug, not the deletion's
])
def test_deleting_a_key_the_run_reads_is_one_line_and_any_other_such_error_keeps_its_traceback(monkeypatch, capsys,
                                                                                               args, cause):
    monkeypatch.setattr("sys.argv", ["glo.run", *args])
    cfg = run_config(*args)
    with pytest.raises(SystemExit if cause else ConfigAttributeError) as e, one_line_errors("glo"):  # as in the job
        instantiate(cfg.module) if cause else cfg.module.no_such_key  # the latter: glo's bug
    assert not cause or e.value.code == 1
    err = capsys.readouterr().err
    assert err == "" if not cause else (err.count("\n") == 1 and err.startswith(
        f"glo: error: {args[0]}: the run needs what was deleted ({cause}") and err.endswith(
        "); set a value instead of deleting it\n")), err


def test_an_unset_environment_variable_in_an_override_is_one_line(tmp_path):
    p = run_glo(*FAST, "data=folder", "data.path=${oc.env:GLO_UNSET_VARIABLE}", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 1 and p.stderr.splitlines() == [
        "glo: error: data.path: cannot resolve its value (KeyError raised while resolving interpolation: "
        "\"Environment variable 'GLO_UNSET_VARIABLE' not found\"); set it or give the value"], p.stderr


@pytest.mark.parametrize("override,refused", [
    ("+foo=1", True), ("+trainer.profiler=simple", False), ("+hydra.job.env_set.A=1", False), ("lr=0.3", False),
])
def test_only_added_keys_outside_any_target_are_refused(override, refused):
    cfg = run_config(override, hydra_node=True)
    with pytest.raises(SystemExit) if refused else contextlib.nullcontext():
        NoUnreadKeys().on_run_start(cfg)
