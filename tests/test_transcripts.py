"""Golden SMTP dialogs for the listener: each tests/transcripts/*.txt file is replayed
against a real in-process relay over a real loopback socket.

A transcript is a readable spec of one session. Its lines:

    # a comment (and blank lines) are ignored
    L: max_recipients: 2          a listener setting for this file's relay
    C: EHLO app.test              a line the client sends (CRLF added)
    S: 250-{HOST}                 a line the server must answer, in order
    S: {CLOSED}                   the server has closed the connection
    M: Subject: dots              a line the delivered message must contain
                                  (in order; the message reaches a capture Maildir)

Consecutive `C:` lines go out in one write, so a run of them is a pipelined
group (and a DATA body is one group ending with `C: .`). After `C: STARTTLS`
and its `S: 220` line the client switches to TLS, verifying the relay's
certificate against the test CA, and goes on inside it.

What varies from run to run is written as a placeholder: in `S:` lines
`{QID}` (a relayd queue id), `{HOST}` (the relay's host name) and `{ANY}`
(any text); in `C:` lines `{PLAIN login password}` (the base64 AUTH PLAIN
response) and `{B64 text}` (text in base64). A failure names the file and
line of the first server line that differs from the spec, with what came.
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NoReturn

import pytest

from tests.relayenv import ACME, RelayFiles, RelayThread, TenantSpec, captured

TRANSCRIPTS = Path(__file__).resolve().parent / "transcripts"
HOSTNAME = "relay.test"  # RelayFiles.write's hostname
READ_TIMEOUT = 15.0  # per server line; the slowest expected reply is a delayed 535
MAX_REPLY_LINE = 4096

_S_PLACEHOLDERS = {
    "{QID}": r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}",
    "{HOST}": re.escape(HOSTNAME),
    "{ANY}": r".*",
}


@dataclass(frozen=True)
class Step:
    """One line of a transcript: what it says and where it is."""

    kind: str  # "C", "S" or "M"
    text: str
    line: int


@dataclass
class Transcript:
    path: Path
    listener: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)

    def where(self, step: Step) -> str:
        return f"{self.path.name}:{step.line}"


def parse(path: Path) -> Transcript:
    transcript = Transcript(path)
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip() or raw.startswith("#"):
            continue
        kind, sep, text = raw.partition(": ")
        if sep == "" and raw in ("C:", "S:", "M:"):  # an empty line of the dialog
            kind, text = raw[0], ""
        elif kind not in ("C", "S", "M", "L"):
            raise ValueError(f"{path.name}:{number}: a line starts with C:, S:, M:, L: or #, not {raw!r}")
        if kind == "L":
            transcript.listener.append(text)
        else:
            transcript.steps.append(Step(kind, text, number))
    return transcript


def client_bytes(text: str) -> bytes:
    """A `C:` line as sent: placeholders filled in, UTF-8, CRLF."""

    def fill(match: re.Match[str]) -> str:
        name, _, argument = match.group(1).partition(" ")
        if name == "PLAIN":
            login, _, password = argument.partition(" ")
            return base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        if name == "B64":
            return base64.b64encode(argument.encode()).decode()
        raise ValueError(f"unknown client placeholder {{{name}}}")

    return re.sub(r"\{([A-Z0-9]+(?: [^}]*)?)\}", fill, text).encode() + b"\r\n"


def server_pattern(text: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[A-Z]+\})", text)
    return re.compile("".join(_S_PLACEHOLDERS.get(part, re.escape(part)) for part in parts) + r"\Z")


class Session:
    """The client side of the dialog: a socket, upgraded to TLS on request, read line by line."""

    def __init__(self, files: RelayFiles) -> None:
        self.files = files
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", files.port), timeout=READ_TIMEOUT)
        self.buffer = b""
        self.heard: list[str] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> str | None:
        """One reply line without its CRLF; None once the server has closed."""
        deadline = time.monotonic() + READ_TIMEOUT
        while b"\r\n" not in self.buffer:
            if len(self.buffer) > MAX_REPLY_LINE or time.monotonic() > deadline:
                raise AssertionError(f"no complete reply line; have {self.buffer[:200]!r}")
            try:
                chunk = self.sock.recv(4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        decoded = line.decode("utf-8", "replace")
        self.heard.append(decoded)
        return decoded

    def start_tls(self) -> None:
        assert self.buffer == b"", f"the server spoke before the TLS handshake: {self.buffer!r}"
        context = ssl.create_default_context(cafile=str(self.files.ca_file))
        self.sock = context.wrap_socket(self.sock, server_hostname="127.0.0.1")

    def close(self) -> None:
        self.sock.close()


def replay(transcript: Transcript, files: RelayFiles) -> None:
    session = Session(files)
    try:
        pending: list[bytes] = []
        last_command = ""
        for step in transcript.steps:
            if step.kind == "C":
                pending.append(client_bytes(step.text))
                last_command = step.text.upper()
                continue
            if pending:
                session.send(b"".join(pending))
                pending = []
            if step.kind == "M":
                continue  # checked once the session is over
            got = session.read_line()
            expected = step.text
            if expected == "{CLOSED}":
                if got is not None:
                    fail(transcript, step, session, "the server to close the connection", got)
                continue
            if got is None:
                fail(transcript, step, session, expected, "(connection closed)")
            elif not server_pattern(expected).match(got):
                fail(transcript, step, session, expected, got)
            if last_command == "STARTTLS" and got.startswith("220 "):
                session.start_tls()
                last_command = ""
        if pending:
            session.send(b"".join(pending))
    finally:
        session.close()
    check_delivered(transcript, files)


def fail(transcript: Transcript, step: Step, session: Session, expected: str, got: str) -> NoReturn:
    heard = "\n".join(f"  S: {line}" for line in session.heard)
    pytest.fail(
        f"{transcript.where(step)}: the first differing server line\n"
        f"  expected: {expected}\n"
        f"  got:      {got}\n"
        f"server lines so far:\n{heard}",
        pytrace=False,
    )


def check_delivered(transcript: Transcript, files: RelayFiles) -> None:
    wanted = [step for step in transcript.steps if step.kind == "M"]
    if not wanted:
        return
    lines = delivered_lines(files)
    at = 0
    for step in wanted:
        while at < len(lines) and lines[at] != step.text:
            at += 1
        if at == len(lines):
            body = "\n".join(f"  {line}" for line in lines)
            pytest.fail(f"{transcript.where(step)}: the delivered message has no line {step.text!r} "
                        f"(after the lines matched before it):\n{body}", pytrace=False)
        at += 1


def delivered_lines(files: RelayFiles) -> list[str]:
    """The lines of the messages the capture Maildir received, once there is one."""
    text = b"".join(captured(files)).decode("utf-8", "replace")
    return text.replace("\r\n", "\n").split("\n")


def transcript_files() -> list[Path]:
    return sorted(TRANSCRIPTS.glob("*.txt"))


@pytest.fixture
def relay_for(relay_files: RelayFiles) -> Iterator[Callable[[Transcript], RelayFiles]]:
    """Starts a relay for one transcript (with its `L:` settings); stops it at the end."""
    running: list[RelayThread] = []

    def start(transcript: Transcript) -> RelayFiles:
        relay_files.write(
            upstreams=[],
            tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["capture"])])],
            capture=True,
            listener_extra="\n".join(transcript.listener),
        )
        thread = RelayThread(relay_files.config)
        thread.__enter__()
        running.append(thread)
        return relay_files

    yield start
    for thread in running:
        thread.__exit__(None, None, None)


@pytest.mark.parametrize("path", transcript_files(), ids=lambda path: path.stem)
def test_listener_dialog_matches_its_transcript(path: Path, relay_for: Callable[[Transcript], RelayFiles]) -> None:
    transcript = parse(path)
    files = relay_for(transcript)
    replay(transcript, files)


# -- the runner itself ---------------------------------------------------------


def test_there_are_transcripts_for_every_listener_behaviour_the_spec_names() -> None:
    names = {path.stem for path in transcript_files()}
    assert {
        "auth-plain-submission", "auth-bad-password", "mail-before-auth", "rcpt-limit",
        "unknown-command", "pipelining", "size-too-big", "ehlo-8bit", "data-dot-stuffing",
        "rset-noop-quit", "too-many-errors",
    } <= names


def test_a_server_line_pattern_fills_placeholders_and_matches_the_whole_line() -> None:
    pattern = server_pattern("250 2.0.0 OK id={QID}")
    assert pattern.match("250 2.0.0 OK id=1tA2bC-0000aB-x9")
    assert not pattern.match("250 2.0.0 OK id=1tA2bC-0000aB-x9 and more")
    assert not pattern.match("250 2.0.0 OK id=not-an-id")
    assert server_pattern("220 {HOST} {ANY}").match("220 relay.test relayd ESMTP ready")
    assert not server_pattern("250 a.b").match("250 aXb")  # literal text is literal


def test_a_client_line_fills_the_auth_placeholders() -> None:
    assert client_bytes("AUTH PLAIN {PLAIN acme secret}") == b"AUTH PLAIN AGFjbWUAc2VjcmV0\r\n"
    assert client_bytes("{B64 acme}") == b"YWNtZQ==\r\n"
    assert client_bytes("EHLO h\u00e9llo") == "EHLO h\u00e9llo\r\n".encode()


def test_a_differing_server_line_fails_naming_the_file_line_and_both_texts(
    tmp_path: Path, relay_for: Callable[[Transcript], RelayFiles]
) -> None:
    spec = tmp_path / "wrong.txt"
    spec.write_text("S: 220 {HOST} {ANY}\nC: NOOP\nS: 250 2.0.0 Not what relayd says\n")
    transcript = parse(spec)
    files = relay_for(transcript)
    with pytest.raises(pytest.fail.Exception) as failure:
        replay(transcript, files)
    message = str(failure.value)
    assert message.startswith("wrong.txt:3: the first differing server line\n")
    assert "  expected: 250 2.0.0 Not what relayd says\n" in message
    assert "  got:      250 " in message
