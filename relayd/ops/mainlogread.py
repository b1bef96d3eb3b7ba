"""A message's lines in the main log file, for a human reading its history.

Takes: the main log's path and a message id (checked for the id shape first).
Emits: the lines of the file's last LOG_READ_CAP bytes that mention the id,
for `relayctl queue show --log` (from the daemon, or from relayctl itself
when relayd is stopped). Nothing learns an outcome from these lines: relayd
answers outcomes from its recent events (relayd.observe.outcomes).
Untrusted input: the file's bytes (decoded with replacement; the caller
sanitises them for the terminal).
Fails: a missing file is no lines; other OSErrors reach the caller.
"""

from __future__ import annotations

import os
from pathlib import Path

from relayd.queue.msgid import is_message_id

LOG_READ_CAP = 64 * 1024 * 1024  # the tail of the main log searched for a message's history


def read_log_lines(path: Path | None, message_id: str, *, cap: int = LOG_READ_CAP) -> list[str]:
    """Main log lines that mention `message_id`, from the last `cap` bytes of the file."""
    if path is None or not is_message_id(message_id):
        return []
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start = max(0, size - cap)
            f.seek(start)
            data = f.read(cap)
    except FileNotFoundError:
        return []
    if start > 0:
        data = data.partition(b"\n")[2]  # the first line was cut
    needle = message_id.encode()
    return [
        line.decode("utf-8", "replace")
        for line in data.split(b"\n")
        if needle in line
    ]
