"""Every tool's declared settings, walked: each setting fed a wrong type, an out-of-range value and, where it has no
default, no value at all, must be refused in one line naming it, before any model loads.

The cases are generated from the declarations (glo.typed.Schema), so a setting added to a tool is tested with them.
"""
from __future__ import annotations

import subprocess
import sys
import typing
from typing import Any

import annotated_types as at
import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from glo import GloError
from glo.app.config import Run, built, validate
from glo.app.typed import Schema, checked, leaf
from glo.bench import Bench
from glo.bench_load import BenchLoad
from glo.bench_load import main as bench_load_main
from glo.evaluate import Evaluate
from glo.evaluate import main as evaluate_main
from glo.inpaint import Inpaint
from glo.method.settings import Settings
from glo.model.hardware import Speed
from glo.prepare import Prepare
from glo.prepare import main as prepare_main
from glo.roundtrip import RoundTrip
from glo.train_inpaint import TrainInpaint
from glo.train_vae import TrainVAE
from tests.conftest import ROOT, compose_config

# tool config -> (its schema, the command-line values it cannot run without, how the tool checks its config)
HYDRA_TOOLS = {
    "run": (Run, [], validate),
    "roundtrip": (RoundTrip, [], lambda cfg: validate(cfg, RoundTrip)),
    "bench": (Bench, [], lambda cfg: checked(Bench, cfg)),
    "inpaint": (Inpaint, ["run_dir=RUN"], lambda cfg: checked(Inpaint, cfg)),
    "train_inpaint": (TrainInpaint, ["runs=[RUN]"], lambda cfg: checked(TrainInpaint, cfg)),
    "train_vae": (TrainVAE, [], lambda cfg: checked(TrainVAE, cfg)),
}
ENGINE = (Settings, Speed)
GROUPS = {d.name for d in (ROOT / "conf").iterdir() if d.is_dir()}  # config groups: a value names a file  # glo.run's method knobs and speed switches: top-level keys, declared by these


def fields(schema: type, prefix: str = "") -> typing.Iterator[tuple[str, Any, list, bool]]:
    """(key, base type, bounds, required) of every declared leaf setting, through nested schemas."""
    for name, info in schema.model_fields.items():
        base, bounds = leaf(info.annotation, list(info.metadata))
        if isinstance(base, type) and issubclass(base, Schema):
            yield from fields(base, f"{prefix}{name}.")
        elif base is not Any:
            yield f"{prefix}{name}", base, bounds, info.is_required()


def wrong_type(base: Any) -> str | None:
    """A value Hydra reads as the wrong type for `base`."""
    if base is str:
        return "5"
    return "abc"  # text: wrong for numbers, booleans, lists, mappings and every Literal here


def out_of_range(bounds: list) -> str | None:
    for b in bounds:
        if isinstance(b, at.Ge):
            return str(b.ge - 1)
        if isinstance(b, at.Gt):
            return str(b.gt)
        if isinstance(b, at.Le):
            return str(b.le * 10 + 1)
        if isinstance(b, at.Lt):
            return str(b.lt)
    return None


def cases() -> list:
    out = []
    defaults = {tool: OmegaConf.to_container(compose_config(tool, *needed)) for tool, (_, needed, _) in HYDRA_TOOLS.items()}
    for tool, (schema, needed, _) in HYDRA_TOOLS.items():
        declared = list(fields(schema))
        if tool in ("run", "roundtrip"):
            declared += [f for s in ENGINE for f in fields(s)]
        for key, base, bounds, required in declared:
            if key in ("task", "section"):  # names only: any text is right
                continue
            if key not in GROUPS:  # `vae=abc` names a config file: Hydra's one line (test_structure)
                out.append(pytest.param(tool, f"{key}={wrong_type(base)}", key, id=f"{tool}-{key}-type"))
            bad = out_of_range(bounds)
            if bad is not None:
                out.append(pytest.param(tool, f"{key}={bad}", key, id=f"{tool}-{key}-range"))
            if required and key not in GROUPS:
                out.append(pytest.param(tool, f"{key}=???", key, id=f"{tool}-{key}-missing"))
                given = any(o.startswith(f"{key}=") for o in needed)
                if "." not in key and defaults[tool].get(key) is not None and not given:  # deleted: ~key
                    out.append(pytest.param(tool, f"~{key}", key, id=f"{tool}-{key}-deleted"))
    return out


@pytest.mark.parametrize("tool,override,key", cases())
def test_every_setting_of_every_tool_is_checked_in_one_line(tool, override, key):
    schema, needed, check = HYDRA_TOOLS[tool]
    given = [o for o in needed if not (override.startswith(o.split("=")[0] + "=") or override == f"~{o.split('=')[0]}")]
    cfg = compose_config(tool, *given, override, hydra_node=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} resolves as in the tool's own process
    with open_dict(cfg):
        del cfg["hydra"]
    with pytest.raises(GloError) as e:
        check(cfg)
    line = str(e.value)
    assert "\n" not in line and line.startswith(key) and ("must" in line or "cannot" in line), line


@pytest.mark.parametrize("schema", [s for s, _, _ in HYDRA_TOOLS.values()] + list(ENGINE))
def test_every_yaml_key_is_declared(schema):
    """A key a tool's YAML adds without a declaration is refused: a new setting cannot skip its check."""
    assert schema.model_config["extra"] == "forbid"


ARGPARSE_TOOLS = {"glo.bench_load": (BenchLoad, bench_load_main, []), "glo.evaluate": (Evaluate, evaluate_main, ["RUN"]),
                  "glo.prepare": (Prepare, prepare_main, ["--src", "SRC"])}


def argparse_cases() -> list:
    out = []
    for tool, (schema, _, _) in ARGPARSE_TOOLS.items():
        for key, base, bounds, _ in fields(schema):
            if base is str or key in ("src", "run_dir"):
                continue
            flag = "--" + key.replace("_", "-")
            out.append(pytest.param(tool, [flag, "abc"], flag, id=f"{tool}-{key}-type"))
            bad = out_of_range(bounds)
            if bad is not None:
                out.append(pytest.param(tool, [flag, bad], flag, id=f"{tool}-{key}-range"))
    return out


@pytest.mark.parametrize("tool,argv,flag", argparse_cases())
def test_every_option_of_the_argparse_tools_is_checked_in_one_line(tool, argv, flag, capsys):
    _, main, needed = ARGPARSE_TOOLS[tool]
    with pytest.raises(SystemExit) as e:
        main([*needed, *argv])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith(f"{tool}: error: {flag}"), err


@pytest.mark.parametrize("module,args,line", [
    ("glo.inpaint", ["RUN", "steps=0"], "glo.inpaint: error: steps=0: must be >= 1"),
    ("glo.train_inpaint", ["runs=[RUN]", "batch_size=0"], "glo.train_inpaint: error: batch_size=0: must be >= 1"),
    ("glo.roundtrip", ["trips=abc"], "glo.roundtrip: error: trips=abc: must be an integer"),
    ("glo.bench", ["family=standin"], "glo.bench: error: family=standin: must be a list, e.g. 'family=[standin]', or null"),
    ("glo.train_vae", ["crop=36"], "glo.train_vae: error: crop=36: must be a multiple of 8"),
    ("glo.run", ["loss.scale=1e-20"], "glo: error: loss.scale=1e-20: must be >= 1e-12"),
    ("glo.bench_load", ["--counts", "0"], "glo.bench_load: error: --counts[0]=0: must be >= 1"),
])
def test_each_tool_checks_its_settings_before_any_work(module, args, line, tmp_path):
    """As a user runs it: one line, exit 1, and no output directory filled."""
    argv = [a.replace("RUN", str(tmp_path / "run")) for a in args]
    p = subprocess.run([sys.executable, "-m", module, *argv, *([] if module == "glo.bench_load" else
                                                               [f"hydra.run.dir={tmp_path / 'out'}"])],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.splitlines() == [line], p.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


def test_a_literal_lists_its_choices():
    with pytest.raises(GloError, match=r"^optim=x: must be one of adam, gradfree, lbfgs$"):
        Settings(**{**dict(compose_settings()), "optim": "x"})


def compose_settings() -> Settings:
    return built(Settings, compose_config("run"))

