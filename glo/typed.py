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
from omegaconf.errors import InterpolationResolutionError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from glo import GloError

S = TypeVar("S", bound="Schema")
B = TypeVar("B", bound="Built")


class Schema(BaseModel):
    """A tool's settings: strict types (YAML's true is not 1, 1.5 is not an integer), finite numbers only."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)



class Built(Schema):
    """A Schema its callers construct (Hydra's instantiate, the engine's users): a wrong value is a GloError too.
    Not for nested schemas: pydantic calls a custom __init__ for them, and the error would lose its path."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise GloError(message(type(self), e.errors()[0])) from None

    def replace(self: B, **changes: Any) -> B:
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
    "int_type": "must be an integer", "float_type": "must be a finite number", "finite_number": "must be a finite number",
    "bool_type": "must be true or false", "string_type": "must be text", "list_type": "must be a list",
    "dict_type": "must be a mapping of key: value", "missing": "must be set",
    "extra_forbidden": "is not a setting of this tool", "int_parsing": "must be an integer",
    "float_parsing": "must be a finite number",
}
BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}


def checked(schema: type[S], cfg: DictConfig | dict[str, Any], prefix: str = "") -> S:
    """`cfg` read against `schema`, or a GloError of one line about its first wrong setting."""
    if isinstance(cfg, DictConfig):
        require(schema, cfg, prefix)
        try:
            found = checked(schema, values(schema, cfg, prefix), prefix)
            missing = sorted(OmegaConf.missing_keys(cfg))  # a `???` inside a node passed on whole
        except InterpolationResolutionError as e:  # ${oc.env:UNSET}
            raise GloError(f"{e.full_key}: cannot resolve its value ({str(e).splitlines()[0]}); set it or give "
                           "the value") from None
        if missing:
            raise GloError(f"{prefix}{missing[0]}: must be set")
        return found
    try:
        return schema.model_validate(cfg)
    except ValidationError as e:
        raise GloError(message(schema, e.errors()[0], prefix)) from None


def require(schema: type[Schema], cfg: DictConfig, prefix: str = "") -> None:
    """A setting deleted on the command line (`~lr`) is one line, before anything reads what interpolates it."""
    absent = [k for k, f in schema.model_fields.items() if f.is_required() and k not in cfg]
    if absent:
        raise GloError(f"{prefix}{absent[0]}: must be set")


def values(schema: type[Schema], node: DictConfig, prefix: str = "") -> dict[str, Any]:
    """`node`'s values as `schema` reads them: declared settings resolved, the nodes it passes on whole (a
    `_target_`'s arguments, typed Any) as written, so their interpolations resolve only where they are used."""
    raw = OmegaConf.to_container(node, resolve=False)
    out = {}
    for key in node:
        if OmegaConf.is_missing(node, key):
            raise GloError(f"{prefix}{key}: must be set")
        field = schema.model_fields.get(str(key))
        base = leaf(field.annotation)[0] if field else None
        if base is Any or (typing.get_origin(base) is dict and typing.get_args(base)[1] is Any):
            out[key] = raw[key]
        elif isinstance(base, type) and issubclass(base, Schema) and isinstance(node[key], DictConfig):
            out[key] = values(base, node[key], f"{prefix}{key}.")
        else:
            value = node[key]
            out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


def leaf(annotation: Any, metadata: list | None = None) -> tuple[Any, list]:
    """A declared type without None and Annotated, and the bounds it carries (annotated_types objects)."""
    metadata = metadata or []
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return leaf(next(a for a in typing.get_args(annotation) if a is not type(None)), metadata)
    if typing.get_origin(annotation) is Annotated:
        base, *extra = typing.get_args(annotation)
        for m in extra:
            metadata = metadata + (m.metadata if isinstance(m, FieldInfo) else [m])
        return leaf(base, metadata)
    return annotation, metadata


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
    elif kind in ("list_type", "tuple_type"):
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
