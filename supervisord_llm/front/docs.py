"""Gate and router settings as JSON, for the control socket. A field the other side does not
know is ignored, one it lacks keeps its default (a front and a daemon of different releases
still understand each other)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from ..config import GateSection, Listen, RouterSection

T = TypeVar("T", GateSection, RouterSection)


def to_doc(cfg: GateSection | RouterSection) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_doc(kind: type[T], doc: object) -> T:
    """`kind` from `doc` (ValueError if it is not one)."""
    if not isinstance(doc, dict):
        raise ValueError("settings: not an object")
    known = {f.name: f for f in dataclasses.fields(kind)}
    values: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in known:
            continue
        if key == "listen":
            if value is None:
                values[key] = None
                continue
            if not isinstance(value, dict) or not isinstance(value.get("host"), str) \
                    or not isinstance(value.get("port"), int):
                raise ValueError("settings: bad listen")
            values[key] = Listen(value["host"], value["port"])
            continue
        if isinstance(value, list):  # (a tuple of strings: allow_paths)
            if not all(isinstance(v, str) for v in value):
                raise ValueError(f"settings: bad {key}")
            values[key] = tuple(value)
            continue
        if value is not None and not isinstance(value, (int, float, str, bool)):
            raise ValueError(f"settings: bad {key}")
        values[key] = value
    try:
        return kind(**values)
    except TypeError as exc:
        raise ValueError(f"settings: {exc}") from None
