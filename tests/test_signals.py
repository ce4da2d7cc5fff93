"""Ctrl+C and SIGTERM end every tool in one line with 130 / 143, whenever they land: while its imports load, while
Hydra composes, while it works. Everything glo writes is written whole or not at all (test_integrity checks the
data; here, what the user sees)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import glo
from glo.app.cli import one_line_errors
from tests.conftest import FAST, ROOT, as_in_hydra_main

CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
LINES = {signal.SIGINT: "stopped by Ctrl+C", signal.SIGTERM: "stopped by SIGTERM"}


def start(module: str, *args: str) -> subprocess.Popen:
    # a shell's background job (CI's, nohup's) inherits SIGINT ignored; give the tool what a terminal gives it
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("after", [0.3, 0.5, 1.0])  # inside the imports, or Hydra composing
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
@pytest.mark.parametrize("module,args", [("glo.evaluate", ["RUN"]), ("glo.inpaint", ["RUN"]),
                                         ("glo.run", [*FAST, "hydra.run.dir=RUN"]), ("glo.bench", ["hydra.run.dir=RUN"])])
def test_a_signal_during_start_up_is_one_line(module, args, sig, after, tmp_path):
    p = start(module, *[a.replace("RUN", str(tmp_path / "run")) for a in args])
    time.sleep(after)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert p.returncode == CODES[sig] and len(lines) == 1 and LINES[sig] in lines[0], err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_a_signal_while_glo_run_works_is_one_line(sig, tmp_path):
    slow = [o for o in FAST if not o.startswith(("data.limit", "max_steps", "batch_size"))]
    p = start("glo.run", *slow, "data.limit=6", "batch_size=1", "max_steps=300", "rel_tol=0", "logger=none",
              f"hydra.run.dir={tmp_path / 'run'}")
    while "images to do" not in (line := p.stdout.readline()):  # the VAE is loaded and the work begins
        assert line, p.stderr.read()
    time.sleep(0.5)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    said = [line for line in err.strip().splitlines() if not line.startswith("[")]  # logged warnings aside
    assert p.returncode == CODES[sig] and len(said) == 1 and "safe in" in said[0], err


@pytest.mark.parametrize("state", ["working", "starting", "importing"])
def test_a_signal_raises_where_it_lands_only_once_the_tool_handles_errors(state, monkeypatch, capsys):
    """Hydra's composition catches Exception (a SIGTERM there was lost and the run went on to the end), and an
    exception raised in an import under torch's pybind11 aborts the process."""
    monkeypatch.setattr(glo, "TOOL", "glo.bench")
    monkeypatch.setattr(glo, "working", state != "starting")
    monkeypatch.setattr(glo.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    namespace: dict = {}
    where = "<frozen importlib._bootstrap>" if state == "importing" else __file__
    exec(compile("import sys\nframe = sys._getframe()", where, "exec"), namespace)
    stop = glo.Stopped("stopped by SIGTERM; every file written is whole")
    with pytest.raises(glo.Stopped if state == "working" else SystemExit) as e:
        glo.stop_here(stop, namespace["frame"])
    if state != "working":
        assert e.value.code == 143
        assert capsys.readouterr().err == "glo.bench: error: stopped by SIGTERM; every file written is whole\n"


@pytest.mark.parametrize("where", ["resolver", "node"])
def test_a_stop_inside_omegaconf_is_glo_s_line_alone(capsys, where):
    """OmegaConf replaces an error raised in a resolver (`from None`), and re-raises one raised while it reads a
    node with `full_key:` and `object_type=` lines appended."""
    from omegaconf import OmegaConf

    from glo import Stopped

    line = "stopped by SIGTERM; every file written is whole"

    def stopped() -> None:
        raise Stopped(line if where == "resolver" else f"{line}\n    full_key: \n    object_type=dict")

    OmegaConf.register_new_resolver("glo_test_stop", stopped, replace=True)
    with pytest.raises(SystemExit) as e, one_line_errors("glo.bench"):
        OmegaConf.to_container(OmegaConf.create({"a": "${glo_test_stop:}"}), resolve=True) if where == "resolver" \
            else stopped()
    assert e.value.code == 143
    assert capsys.readouterr().err == "glo.bench: error: stopped by SIGTERM; every file written is whole\n"


def sigterm_then(call):
    """`call`, after this process is sent SIGTERM (its handler runs before the next line)."""
    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return call(*args, **kwargs)
    return wrapped


@pytest.mark.parametrize("where,how,published", [
    ("glo.run.load_model", "stopped by SIGTERM; 0 image(s) are safe", False),  # before the first batch
    ("glo.app.export.LatentExporter.merge", "stopped by SIGTERM during the merge; 3 image(s) are safe", True),
    ("glo.report.evaluation.evaluate", "stopped by SIGTERM; 3 image(s) are safe", True),  # the report
])
def test_sigterm_outside_the_batches_is_one_line_and_exit_143(where, how, published, monkeypatch, tmp_path,
                                                               capsys):
    """Inside the batches Lightning lets the batch in flight finish (test_integrity); elsewhere the default
    handler ended the run without a word, and during the report Lightning's left SIGTERM ignored."""
    import glo.app.export
    import glo.report.evaluation
    import glo.run

    owner, name = where.rsplit(".", 1)
    target = {"glo.run": glo.run, "glo.app.export.LatentExporter": glo.app.export.LatentExporter,
              "glo.report.evaluation": glo.report.evaluation}[owner]
    monkeypatch.setattr(target, name, sigterm_then(getattr(target, name)))
    with pytest.raises(SystemExit) as e, one_line_errors("glo"):
        glo.run.run(as_in_hydra_main(monkeypatch, tmp_path, *FAST, "logger=none"))
    assert e.value.code == 143
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if "SIGTERM" in ln] == [
        f"glo: error: {how} in {tmp_path / 'shards'}: run the same command again to resume"], err
    assert (tmp_path / "latents.npz").exists() == published and (tmp_path / "report.md").exists() is False
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the caller's again
