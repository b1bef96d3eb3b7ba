"""relayctl's and mailq's side of the control socket (the daemon's side is relayd.ops.control).

Takes: a command name and its arguments; the socket path from relay.yaml.
Emits: the daemon's JSON answer lines, as dicts, the final one (``done:
true``) last. The protocol is described in relayd.ops.control.
Untrusted input: the daemon's answers (each line bounded by MAX_REPLY_LINE,
parsed as JSON; anything else is ControlUnavailable).
Fails: `DaemonNotRunning` when no daemon listens (the spool may then be used
directly, under relayd.queue.spoollock); `ControlUnavailable`, in one sentence, when
the daemon cannot be reached or stops answering.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from relayd.jsonwire import JsonObject, JsonOut

MAX_REPLY_LINE = 256 * 1024 * 1024  # a shown body can be a whole 25 MB message, JSON-escaped
_SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes; leave room for the terminator


class ControlUnavailable(Exception):
    """The daemon cannot be reached; the text says why in one sentence."""


class DaemonNotRunning(ControlUnavailable):
    """No daemon listens on the socket (missing or refused): the spool may be used directly."""


@contextlib.contextmanager
def socket_name(path: Path) -> Iterator[str]:
    """A name for `path` short enough for sockaddr_un (via /proc/self/fd when it is long)."""
    if len(os.fsencode(str(path))) <= _SUN_PATH_MAX:
        yield str(path)
        return
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dir_fd}/{path.name}"
    finally:
        os.close(dir_fd)


class ControlClient:
    """relayctl's side: one connection per request, blocking, bounded by `timeout` per line."""

    def __init__(self, path: Path, *, timeout: float = 180.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def request(self, cmd: str, **args: JsonOut) -> JsonObject:
        """The final answer (``ok`` true or false); intermediate lines are skipped."""
        final: JsonObject = {}
        for message in self.stream(cmd, **args):
            final = message
        return final

    def stream(self, cmd: str, **args: JsonOut) -> Iterator[JsonObject]:
        """Every answer line, the final one (``done: true``) last."""
        sock = self._connect()
        with sock, sock.makefile("rb") as reader:
            line = json.dumps({"cmd": cmd, **args}, separators=(",", ":")).encode() + b"\n"
            try:
                sock.sendall(line)
                while True:
                    raw = reader.readline(MAX_REPLY_LINE)
                    if not raw:
                        raise ControlUnavailable(
                            "relayd closed the control connection before answering (is it stopping?)"
                        )
                    message = json.loads(raw)
                    if not isinstance(message, dict):
                        raise ControlUnavailable("relayd sent an answer that is not a JSON object")
                    yield message
                    if message.get("done"):
                        return
            except socket.timeout:
                raise ControlUnavailable(f"relayd did not answer within {self.timeout:g}s") from None
            except (BrokenPipeError, ConnectionResetError):
                raise ControlUnavailable("relayd closed the control connection (is it stopping?)") from None
            except ValueError:
                raise ControlUnavailable("relayd sent an answer that is not JSON") from None

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            with socket_name(self.path) as name:
                sock.connect(name)
        except FileNotFoundError:
            sock.close()
            raise DaemonNotRunning(f"relayd is not running (no control socket at {self.path})") from None
        except ConnectionRefusedError:
            sock.close()
            raise DaemonNotRunning(f"relayd is not running (nothing listens on {self.path})") from None
        except PermissionError:
            sock.close()
            raise ControlUnavailable(
                f"permission denied on {self.path}: run relayctl as relayd's user or root"
            ) from None
        except OSError as exc:
            sock.close()
            raise ControlUnavailable(f"cannot reach relayd at {self.path}: {exc.strerror or exc}") from None
        return sock
