"""The shape of JSON as it crosses a socket: what `json.loads` can return.

Takes and emits nothing: type names only, shared by the control socket's two
sides (relayd.ops.control, relayd.ops.controlclient) and the queue's wire
format (relayd.queue.queuewire), so a payload is checked where it is read
instead of being typed `Any`.
"""

from __future__ import annotations

from typing import TypeAlias, Union

JsonValue: TypeAlias = Union[None, bool, int, float, str, list["JsonValue"], dict[str, "JsonValue"]]
JsonObject: TypeAlias = dict[str, JsonValue]
