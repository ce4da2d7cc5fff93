"""The structure a newcomer relies on: one source of defaults, one settings object, a light library, rooms that
keep to their imports."""
import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from glo import GloError
from glo.app.config import built
from glo.method.settings import Settings
from glo.model.hardware import Speed
from tests.conftest import ROOT, compose_config, run_config


@pytest.mark.parametrize("module", ["glo", "glo.latents", "glo.method.engine", "glo.method.fit"])
def test_the_library_imports_neither_lightning_nor_hydra(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'hydra', 'omegaconf')))"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


GLO = ROOT / "glo"
TOOLS = sorted(p.stem for p in GLO.glob("*.py") if p.stem not in ("__init__", "latents", "layout"))  # python -m glo.<tool>
ROOMS = sorted(p.name for p in GLO.iterdir() if (p / "__init__.py").is_file())


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (the tools import heavy ones late)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_the_house_has_its_rooms_and_tools():
    """The layout the README's map describes: a library of rooms, and tools apart."""
    assert ROOMS == ["app", "data", "method", "model", "pretrained", "report", "standin", "store", "train"]
    assert TOOLS == ["bench", "bench_load", "compare", "evaluate", "inpaint", "prepare", "roundtrip", "run", "to_hf",
                     "train_inpaint", "train_vae"]


@pytest.mark.parametrize("path", sorted(GLO.rglob("*.py")), ids=lambda p: str(p.relative_to(GLO)))
def test_no_module_imports_a_tool_but_its_own_entry_point(path):
    """A tool is an entry point: the library never imports one, nor does one tool another (shared code moves
    into a room)."""
    tools = {f"glo.{t}" for t in TOOLS} - {f"glo.{path.stem}"}
    assert not {m for m in imports(path) if m in tools or m.rsplit(".", 1)[0] in tools}


@pytest.mark.parametrize("path", sorted((GLO / "method").glob("*.py")), ids=lambda p: p.name)
def test_the_method_imports_torch_and_itself_only(path):
    """The method is plain PyTorch: no Lightning, Hydra, disk formats or pictures, and of glo only the method,
    the model it fits through (the VAE, the machine's precision) and glo.layout's names."""
    outside = {m for m in imports(path) if m.split(".")[0] in ("lightning", "hydra", "omegaconf", "diffusers",
                                                                "h5py", "PIL", "matplotlib")}
    glo = {m for m in imports(path) if m.startswith("glo.")
           and not m.startswith(("glo.method", "glo.model", "glo.layout"))
           and m not in ("glo.GloError", "glo.is_number")}
    assert not outside and not glo


WEIGHTS = ("pretrained", "standin")  # shipped weights and their model cards: no code but where they are
# from the ground up (glo.layout: the run directory's format, which every room reads); the tools on top
LAYERS = ("layout", "model", "method", "data", "store", "report", "app", "train")


def room(module: str) -> str | None:
    """The room a glo module lives in (glo.latents, the reader of what store writes, is store's)."""
    parts = module.split(".")
    if parts[0] != "glo" or len(parts) < 2 or parts[1] in ("GloError", "Stopped", "is_number"):
        return None
    return "store" if parts[1] == "latents" else parts[1]


@pytest.mark.parametrize("path", [p for p in sorted(GLO.rglob("*.py")) if room(f"glo.{p.relative_to(GLO).parts[0]}")
                                  in LAYERS + WEIGHTS], ids=lambda p: str(p.relative_to(GLO)))
def test_each_room_imports_only_the_rooms_below_it(path):
    """Layers look down only: a room never needs one above it, so each can be read and tested from the ground
    up. Lightning lives in the app shell and the trainers above it."""
    own = room(f"glo.{path.relative_to(GLO).with_suffix('').as_posix().replace('/', '.')}")
    if own in WEIGHTS:
        assert not {m for m in imports(path) if room(m)}
        return
    above = set(LAYERS[LAYERS.index(own) + 1:])
    assert not {m for m in imports(path) if room(m) in above}
    if LAYERS.index(own) < LAYERS.index("app"):
        assert not {m for m in imports(path) if m.split(".")[0] == "lightning"}


@pytest.mark.parametrize("override, message, needs_torch", [
    ("max_step=5", "max_step=5: glo has no setting max_step (did you mean max_steps=5?)", False),  # Hydra's
    ("batch_size=0", "batch_size=0: must be >= 1", False),                                   # glo.run's validate
    ("resume=maybe", "resume=maybe: must be one of auto, restart", False),
    ("lr=-1", "lr=-1: must be > 0", True),                                       # the engine's Settings
    ("tile_size=100", "tile_size=100: must be 0 (no tiling) or a multiple of 8 from 64 up", True),  # Speed: torch
])
def test_a_bad_setting_is_refused_before_the_heavy_libraries_are_imported(override, message, needs_torch):
    """glo.run imports neither Lightning nor diffusers (seconds each) before the settings are checked, nor torch
    before those that need no torch, so a typo is refused at once; a top-level import of any of them in
    glo/run.py, or of diffusers beside Speed, fails this."""
    forbidden = {"lightning", "diffusers"} | ({"torch"} if not needs_torch else set())
    code = (f"import runpy, sys; sys.argv = ['glo.run', '{override}']\n"  # python -m glo.run OVERRIDE
            "try:\n    runpy.run_module('glo.run', run_name='__main__', alter_sys=True)\n"
            f"finally:\n    print(sorted({{m.split('.')[0] for m in sys.modules}} & {forbidden!r}))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith(f"glo: error: {message}") and p.stderr.count("\n") == 1, p.stderr
    assert p.stdout.strip() == "[]"


@pytest.mark.parametrize("tool, arg, message", [
    ("glo.bench", "max_step=5", "glo: error: max_step=5: glo has no setting max_step"),
    ("glo.roundtrip", "max_step=5", "glo: error: max_step=5: glo has no setting max_step (did you mean max_steps=5?)"),
    ("glo.evaluate", "/nonexistent", "glo.evaluate: error: /nonexistent/latents.npz: no such file"),
    ("glo.train_vae", "max_step=5", "glo: error: max_step=5: glo has no setting max_step"),  # its LightningModule
])
def test_the_other_tools_refuse_bad_input_before_diffusers_torchmetrics_or_lightning(tool, arg, message):
    """glo.model.vae imports diffusers, and glo.method.metrics torchmetrics, only to build a model or score (seconds each): a tool
    that imports them refuses a typo only after they load. A top-level import of either fails this."""
    code = (f"import runpy, sys; sys.argv = ['{tool}', '{arg}']\n"  # python -m TOOL ARG
            f"try:\n    runpy.run_module('{tool}', run_name='__main__', alter_sys=True)\n"
            "finally:\n    print(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'torchmetrics', "
            "'lightning'}))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith(message) and p.stderr.count("\n") == 1, p.stderr
    assert p.stdout.strip() == "[]"


def test_a_default_lives_in_the_yaml_only():
    """No setting has a Python default that could drift from conf/run.yaml."""
    for cls in (Settings, Speed):
        assert all(f.is_required() for f in cls.model_fields.values()), cls


@pytest.mark.parametrize("key, value", [("lr", 0.123), ("max_steps", 7), ("rel_tol", 0.02), ("window", 2),
                                        ("betas", [0.5, 0.9]), ("optim", "gradfree"), ("precision", "bf16")])
def test_a_top_level_knob_reaches_the_engine(key, value):
    """Changing a default is one line of YAML (or one override): the engine receives exactly that value."""
    s = built(Settings, run_config(f"{key}={value}"))
    assert getattr(s, key) == (tuple(value) if isinstance(value, list) else value)


def test_every_engine_setting_is_wired_from_the_config():
    cfg = run_config()
    assert set(Settings.model_fields) | set(Speed.model_fields) <= set(cfg)  # each built from its top-level keys
    s = built(Settings, cfg)
    assert all(getattr(s, k) == (tuple(cfg[k]) if k == "betas" else cfg[k]) for k in Settings.model_fields)


def test_the_prototype_experiment_is_the_published_budget():
    cfg = run_config("experiment=prototype")
    s = built(Settings, cfg)
    assert (s.lr, s.betas, s.max_steps, s.rel_tol, s.precision, cfg.batch_size) == (0.1, (0.9, 0.999), 50, 0, "fp32", 1)
    assert built(Settings, run_config("experiment=prototype", "lr=0.2")).lr == 0.2  # the command line still wins


@pytest.mark.parametrize("override, message", [
    ("betas=[0.9]", "betas[1]: must be set"),
    ("betas=[0.9,1.0]", "betas[1]=1.0: must be < 1"),
    ("lr=0", "lr=0: must be > 0"),
    ("lr=true", "lr=True: must be a finite number"),
    ("max_steps=1.5", "max_steps=1.5: must be an integer"),
    ("window=0", "window=0: must be >= 1"),
    ("anderson=-1", "anderson=-1: must be >= 0"),
    ("anderson=1.5", "anderson=1.5: must be an integer"),
    ("schedule=linear", "schedule=linear: must be one of constant, cosine"),
    ("warmup_steps=10", "warmup_steps=10: must be <= max_steps=9, or lr is never reached"),
    ("eps=0", "eps=0: must be > 0"),
    ("precision=fp8", "precision=fp8: must be one of auto, fp32, bf16, fp16"),
])
def test_settings_check_themselves(override, message):
    with pytest.raises(GloError, match=re.escape(message)):
        Settings(**_fields(run_config(override)))


@pytest.mark.parametrize("override", ["betas=[0,0.99]", "max_steps=1", "rel_tol=0", "window=1", "warmup_steps=0",
                                      "warmup_steps=7"])
def test_the_edges_of_each_range_are_allowed(override):
    Settings(**_fields(run_config(override)))


@pytest.mark.parametrize("override, message", [
    ("channels_last=1", "channels_last=1: must be true or false"),
    ("checkpointing=yes", "checkpointing=yes: must be true or false"),
    ("tile_size=100", "tile_size=100: must be 0 (no tiling) or a multiple of 8 from 64 up"),
    ("tile_size=16", "tile_size=16: must be 0 (no tiling) or a multiple of 8 from 64 up"),
])
def test_speed_switches_check_themselves(override, message):
    with pytest.raises(Exception) as e:
        built(Speed, run_config(override))
    cause = e.value
    while cause is not None and not isinstance(cause, GloError):
        cause = cause.__cause__
    assert cause is not None and str(cause) == message


def _fields(cfg) -> dict:
    return {k: (list(cfg[k]) if k == "betas" else cfg[k]) for k in Settings.model_fields}


@pytest.mark.parametrize("tool, header, key", [
    ("run", "optimize the VAE latents of a set of images and export them as a dataset.", "max_steps: 9"),
    ("bench", "the published prototype's loop and glo's options on the same images and VAE.", "repeats:"),
    ("roundtrip", "repeated encode -> decode trips, the encoder's latent against glo's.", "trips:"),
    ("train_vae", "train the stand-in KL-f8 VAE that glo ships.", "kl_weight:"),
])
def test_help_names_the_tool_says_what_it_does_and_lists_its_settings(tool, header, key):
    """Hydra's own help opened with 'run is powered by Hydra', naming neither glo nor the command."""
    p = subprocess.run([sys.executable, "-m", f"glo.{tool}", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"python -m glo.{tool}: {header}\n"), p.stdout[:300]
    assert f"\n{key}" in p.stdout and "powered by Hydra" not in p.stdout
    assert p.stdout.rstrip().endswith("README.md says what each does.\nHydra's own options: --hydra-help")


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every `python -m glo.run|bench|roundtrip ...` command in the README and docs/, as (tool, overrides)."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text().replace("\\\n", " ")
        for m in re.finditer(r"python -m glo\.(run|bench|roundtrip)\b([^`\n#]*)", text):
            args = [a for a in shlex.split(m.group(2)) if "=" in a and not a.startswith("-")]
            # a sweep (--multirun loss=l1,l2) composes each job from one value of each list
            args = [a if a.split("=", 1)[1][:1] in "['\"" else a.split(",")[0] for a in args]
            found.append((f"{page.name}: {m.group(0).strip()}", m.group(1), args))
    return found


@pytest.mark.parametrize("where, tool, overrides", documented_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_documented_command_composes(where, tool, overrides):
    """A renamed or removed key fails here, not in a reader's terminal."""
    compose_config(tool, *overrides, hydra_node=True)


MACHINE_DIR = re.compile(r"(?<![\w.~])/(tmp|home|root|work|Users|mnt|scratch|data|opt)/")


@pytest.mark.parametrize("path", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_docs_name_no_directory_of_the_machine_that_wrote_them(path):
    """A published figure names its data as a reader can reproduce it: a project path or the dataset's name."""
    assert not [line for line in path.read_text().splitlines() if MACHINE_DIR.search(line)]


def test_a_published_command_keeps_its_paths_inside_the_project_and_drops_the_machine_s():
    from glo.report.render import reproducible

    command = (f"python -m glo.bench data.path={ROOT.parent}/shared/data/bsds500/val 'out={ROOT}/experiments/x' "
               "run_dir='/tmp/glo/data/val_boxes' lr=0.1 section=a/b")
    assert reproducible(command) == ("python -m glo.bench data.path=../shared/data/bsds500/val 'out=experiments/x' "
                                     "run_dir='val_boxes' lr=0.1 section=a/b")


def test_the_code_keeps_ruff_s_rules_and_format():
    """pyproject.toml's [tool.ruff]: lines of at most 100 characters, pyflakes, sorted imports, and
    glo/ in ruff's format, so a long line or an unused import fails here and not in review."""
    ruff = [sys.executable, "-m", "ruff"]
    for args in (["check", "glo", "tests"], ["format", "--check", "glo"]):
        p = subprocess.run([*ruff, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
    assert max(len(line) for p in GLO.rglob("*.py") for line in p.read_text().splitlines()) <= 100


def test_the_documented_columns_are_the_declared_ones():
    """docs/run-directory.md's table is glo.layout's, written by columns_table(): a column added,
    renamed or retyped in the declaration changes the docs or fails here."""
    from glo.layout import columns_table

    assert columns_table() in (ROOT / "docs" / "run-directory.md").read_text(), (
        "docs/run-directory.md: paste python -c 'import glo.layout as l; print(l.columns_table())'")
