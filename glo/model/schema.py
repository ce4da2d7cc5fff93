"""The typed declaration every setting of glo has: a pydantic model with types and bounds, and its
errors as one line naming the setting and what it takes. Plain pydantic, so the method's own
settings use it too."""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from glo import GloError

S = TypeVar("S", bound="Schema")
B = TypeVar("B", bound="Built")


class Schema(BaseModel):
    """A tool's settings: strict types (YAML's true is not 1, 1.5 is not an integer), finite numbers
    only."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class Built(Schema):
    """A Schema its callers construct (Hydra's instantiate, the engine's users): a wrong value is a
    GloError too. Not for nested schemas: pydantic calls a custom __init__ for them, and the error
    would lose its path."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise GloError(message(type(self), e.errors()[0])) from None

    def replace(self: B, **changes: Any) -> B:
        """A copy with `changes`, checked as the original was."""
        return type(self)(**{**dict(self), **changes})


Count = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]
Positive = Annotated[float, Field(gt=0)]
Device = typing.Literal["auto", "cpu", "cuda", "mps"]
MESSAGES = {
    "int_type": "must be an integer",
    "float_type": "must be a finite number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be text",
    "list_type": "must be a list",
    "dict_type": "must be a mapping of key: value",
    "missing": "must be set",
    "extra_forbidden": "is not a setting of this tool",
    "int_parsing": "must be an integer",
    "float_parsing": "must be a finite number",
}
BOUNDS = {
    "greater_than_equal": ">=",
    "greater_than": ">",
    "less_than": "<",
    "less_than_equal": "<=",
}


def message(schema: type[Schema], error: dict[str, Any], prefix: str = "") -> str:
    """One pydantic error as `key=value: must be ...` (the value as given)."""
    loc = error["loc"]
    key = prefix + ".".join(
        str(part) if isinstance(part, str) else f"[{part}]" for part in loc
    ).replace(".[", "[")
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in BOUNDS:
        bound = next(iter(ctx.values()))
        what = f"must be {BOUNDS[kind]} {f'{bound:g}' if isinstance(bound, float) else bound}"
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


def leaf(annotation: Any, metadata: list | None = None) -> tuple[Any, list]:
    """A declared type without None and Annotated, and the bounds it carries (annotated_types
    objects)."""
    metadata = metadata or []
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return leaf(next(a for a in typing.get_args(annotation) if a is not type(None)), metadata)
    if typing.get_origin(annotation) is Annotated:
        base, *extra = typing.get_args(annotation)
        for m in extra:
            metadata = metadata + (m.metadata if isinstance(m, FieldInfo) else [m])
        return leaf(base, metadata)
    return annotation, metadata


def _nullable(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _nullable(typing.get_args(annotation)[0])
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)
