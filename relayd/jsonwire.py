"""The shape of JSON as it crosses a socket: what `json.loads` can return.

Takes and emits nothing: type names only, shared by the control socket's two
sides (relayd.ops.control, relayd.ops.controlclient) and the queue's wire
format (relayd.queue.queuewire), so a payload is checked where it is read
instead of being typed `Any`.
"""

from __future__ import annotations

from typing import Mapping, Sequence, TypeAlias, Union

JsonValue: TypeAlias = Union[None, bool, int, float, str, list["JsonValue"], dict[str, "JsonValue"]]
JsonObject: TypeAlias = dict[str, JsonValue]

# What a payload being sent may hold: read-only containers, so a list[str] or
# a dict[str, str] built for an answer is one without copying.
JsonOut: TypeAlias = Union[None, bool, int, float, str, Sequence["JsonOut"], Mapping[str, "JsonOut"]]
JsonOutObject: TypeAlias = Mapping[str, JsonOut]


def as_int(value: JsonValue) -> int:
    """`int(value)` for a number or numeric string read from JSON; TypeError for anything else."""
    if isinstance(value, (int, float, str)):
        return int(value)
    raise TypeError(f"int() argument must be a string or a number, not '{type(value).__name__}'")


def as_float(value: JsonValue) -> float:
    """`float(value)` for a number or numeric string read from JSON; TypeError for anything else."""
    if isinstance(value, (int, float, str)):
        return float(value)
    raise TypeError(f"float() argument must be a string or a real number, not '{type(value).__name__}'")


def scalar_fields(fields: Mapping[str, object]) -> JsonObject:
    """`fields` as a JSON object of plain values (str, number, bool, None); TypeError for any other
    value, as `json.dumps` would raise when sending it."""
    out: JsonObject = {}
    for name, value in fields.items():
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
        out[name] = value
    return out


def as_list(value: JsonValue) -> list[JsonValue]:
    """A JSON array read back; an absent value (None) is empty; TypeError for anything else."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise TypeError(f"expected a JSON array, not '{type(value).__name__}'")
    return value


def as_object(value: JsonValue) -> JsonObject:
    """A JSON object read back; an absent value (None) is empty; TypeError for anything else."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, not '{type(value).__name__}'")
    return value


def as_objects(value: JsonValue) -> list[JsonObject]:
    """A JSON array of objects read back; an absent value (None) is empty."""
    objects = as_list(value)
    if not all(isinstance(item, dict) for item in objects):
        raise TypeError("expected a JSON array of objects")
    return [as_object(item) for item in objects]
