"""A tool's settings checked against its declaration (glo.model.schema) before any model loads: the
composed Hydra config, or an argparse command line; and the types only tools take (a file to
publish, glo.run overrides)."""

from __future__ import annotations

import argparse
import os
import tempfile
import typing
from pathlib import Path
from typing import Annotated, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError
from pydantic import AfterValidator, ValidationError

from glo import GloError
from glo.model.schema import (  # noqa: F401  (the declarations' types, for the tools' schemas)
    Built,
    Count,
    Device,
    NonNegative,
    Positive,
    S,
    Schema,
    Seed,
    leaf,
    message,
)


def _writable_file(value: str | None) -> str | None:
    """A file the tool writes at the end: checked first, so a path that cannot be written costs no
    work."""
    if value is None:
        return None
    path = Path(value).expanduser()
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
    try:
        if path.is_dir():
            raise IsADirectoryError
        with tempfile.TemporaryFile(dir=folder):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError
    except OSError:
        raise ValueError(f"cannot write {path}: give a file in a folder you can write") from None
    return value


Publish = Annotated[str | None, AfterValidator(_writable_file)]  # a Markdown file, or null
Overrides = list[str]  # glo.run overrides, e.g. [lr=0.1, max_steps=49]


def checked(schema: type[S], cfg: DictConfig | dict[str, Any], prefix: str = "") -> S:
    """`cfg` read against `schema`, or a GloError of one line about its first wrong setting."""
    if isinstance(cfg, DictConfig):
        require(schema, cfg, prefix)
        try:
            found = checked(schema, values(schema, cfg, prefix), prefix)
        except InterpolationResolutionError as e:  # ${oc.env:UNSET}
            raise GloError(
                f"{e.full_key}: cannot resolve its value ({str(e).splitlines()[0]}); set it or "
                "give the value"
            ) from None
        try:
            missing = sorted(OmegaConf.missing_keys(cfg))  # a `???` inside a node passed on whole
        # resolved where it is used (${hydra:...} inside the job)
        except InterpolationResolutionError:
            missing = []
        if missing:
            raise GloError(f"{prefix}{missing[0]}: must be set")
        return found
    try:
        return schema.model_validate(cfg)
    except ValidationError as e:
        raise GloError(message(schema, e.errors()[0], prefix)) from None


def require(schema: type[Schema], cfg: DictConfig, prefix: str = "") -> None:
    """A setting deleted on the command line (`~lr`) is one line, before anything reads what
    interpolates it."""
    absent = [k for k, f in schema.model_fields.items() if f.is_required() and k not in cfg]
    if absent:
        raise GloError(f"{prefix}{absent[0]}: must be set")


def values(schema: type[Schema], node: DictConfig, prefix: str = "") -> dict[str, Any]:
    """`node`'s values as `schema` reads them: declared settings resolved, the nodes it passes on
    whole (a `_target_`'s arguments, typed Any) as written, so their interpolations resolve only
    where they are used."""
    raw = OmegaConf.to_container(node, resolve=False)
    out = {}
    for key in node:
        if OmegaConf.is_missing(node, key):
            raise GloError(f"{prefix}{key}: must be set")
        field = schema.model_fields.get(str(key))
        base = leaf(field.annotation)[0] if field else None
        if base is Any or (typing.get_origin(base) is dict and typing.get_args(base)[1] is Any):
            out[key] = raw[key]
        elif (
            isinstance(base, type)
            and issubclass(base, Schema)
            and isinstance(node[key], DictConfig)
        ):
            out[key] = values(base, node[key], f"{prefix}{key}.")
        else:
            value = node[key]
            out[key] = (
                OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            )
    return out


def parsed(schema: type[S], parser: argparse.ArgumentParser, argv: list[str] | None) -> S:
    """A command line's options (each argument text; `schema` gives their types), or one line and
    exit 1."""
    args = vars(parser.parse_args(argv))
    try:
        return schema.model_validate(args, strict=False)
    except ValidationError as e:
        error = e.errors()[0]
        flag = str(error["loc"][0])
        positional = any(a.dest == flag and not a.option_strings for a in parser._actions)
        line = message(schema, error, "" if positional else "--").replace(
            flag, flag if positional else flag.replace("_", "-"), 1
        )
        parser.exit(1, f"{parser.prog.split()[-1]}: error: {line}\n")


class Parser(argparse.ArgumentParser):
    """argparse with its errors (an unknown flag, a missing argument) in one line, as every glo
    error is."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(
            2,
            f"{self.prog.split()[-1]}: error: {message} (python -m {self.prog.split()[-1]} "
            "--help)\n",
        )
