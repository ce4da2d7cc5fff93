"""Each tool's settings as one typed declaration, checked before any model loads.

A tool declares its config's keys once, as a `Schema` (a pydantic model with types and bounds); `checked`
reads the composed Hydra config against it. A wrong type, a value out of range, a missing value or a key the
YAML adds without declaring it is one line naming the setting and what it takes.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from glo import GloError

S = TypeVar("S", bound="Schema")


class Schema(BaseModel):
    """A tool's settings: strict types (YAML's true is not 1, 1.5 is not an integer), finite numbers only."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise GloError(message(type(self), e.errors()[0])) from None

    def replace(self: S, **changes: Any) -> S:
        """A copy with `changes`, checked as the original was."""
        return type(self)(**{**dict(self), **changes})


def _writable_file(value: str | None) -> str | None:
    """A file the tool writes at the end: checked first, so a path that cannot be written costs no work."""
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


Count = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]
Positive = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Device = typing.Literal["auto", "cpu", "cuda", "mps"]
Publish = Annotated[str | None, AfterValidator(_writable_file)]  # a Markdown file, or null
Overrides = list[str]  # glo.run overrides, e.g. [lr=0.1, max_steps=49]

MESSAGES = {
    "int_type": "must be an integer", "float_type": "must be a finite number", "finite_number": "must be finite",
    "bool_type": "must be true or false", "string_type": "must be text", "list_type": "must be a list",
    "dict_type": "must be a mapping of key: value", "missing": "must be set",
    "extra_forbidden": "is not a setting of this tool", "int_parsing": "must be an integer",
    "float_parsing": "must be a finite number",
}
BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}


def checked(schema: type[S], cfg: DictConfig | dict[str, Any], prefix: str = "") -> S:
    """`cfg` read against `schema`, or a GloError of one line about its first wrong setting."""
    if isinstance(cfg, DictConfig):
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise GloError(f"{prefix}{missing[0]}: must be set")
        cfg = OmegaConf.to_container(cfg, resolve=True)
    try:
        return schema.model_validate(cfg)
    except ValidationError as e:
        raise GloError(message(schema, e.errors()[0], prefix)) from None


def parsed(schema: type[S], parser: argparse.ArgumentParser, argv: list[str] | None) -> S:
    """A command line's options (each argument text; `schema` gives their types), or one line and exit 1."""
    args = vars(parser.parse_args(argv))
    try:
        return schema.model_validate(args, strict=False)
    except ValidationError as e:
        error = e.errors()[0]
        flag = str(error["loc"][0])
        positional = any(a.dest == flag and not a.option_strings for a in parser._actions)
        line = message(schema, error, "" if positional else "--").replace(flag, flag if positional else
                                                                          flag.replace("_", "-"), 1)
        parser.exit(1, f"{parser.prog.split()[-1]}: error: {line}\n")


class Parser(argparse.ArgumentParser):
    """argparse with its errors (an unknown flag, a missing argument) in one line, as every glo error is."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog.split()[-1]}: error: {message} (python -m {self.prog.split()[-1]} --help)\n")


def message(schema: type[Schema], error: dict[str, Any], prefix: str = "") -> str:
    """One pydantic error as `key=value: must be ...` (the value as given)."""
    loc = error["loc"]
    key = prefix + ".".join(str(part) if isinstance(part, str) else f"[{part}]" for part in loc).replace(".[", "[")
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in BOUNDS:
        what = f"must be {BOUNDS[kind]} {next(iter(ctx.values())):g}"
    elif kind == "multiple_of":
        what = f"must be a multiple of {ctx['multiple_of']}"
    elif kind == "literal_error":
        what = f"must be one of {ctx['expected'].replace(chr(39), '').replace(' or ', ', ')}"
    elif kind == "too_short":
        what = f"must hold at least {ctx['min_length']}"
    elif kind == "list_type":
        what = f"must be a list, e.g. '{key}=[{error['input']}]'"
    elif kind == "value_error":
        what = str(ctx.get("error", error["msg"]))
    else:
        what = MESSAGES.get(kind, error["msg"][0].lower() + error["msg"][1:])
    if _nullable(_annotation(schema, loc)) and kind != "value_error":
        what += ", or null"
    if kind in ("missing",):
        return f"{key}: {what}"
    given = "null" if error["input"] is None else error["input"]  # as typed: steps=abc
    return f"{key}={given}: {what}"


def _annotation(schema: type[Schema], loc: tuple) -> Any:
    """The declared type at `loc`, through nested schemas; None past what is declared."""
    annotation: Any = schema
    for part in loc:
        fields = getattr(annotation, "model_fields", None)
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
    return annotation


def _nullable(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _nullable(typing.get_args(annotation)[0])
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)
