"""Ready-to-paste client settings: how an application connects to a relayd listener.

Takes: the listener's host, port and TLS mode, the tenant's login, and the
certificate a client must trust when it is self-signed.
Emits: text snippets for nodemailer and Python smtplib. The password is never
part of a snippet: snippets read it from $SMTP_PASSWORD, so the caller prints
the password once, on its own line, and a pasted snippet holds no secret.
Untrusted input: none (all values come from the validated config).
Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from relayd.config.model import TlsMode

PASSWORD_ENV = "SMTP_PASSWORD"


@dataclass(frozen=True, slots=True)
class SubmissionAccess:
    """What an application needs to reach one listener as one tenant."""

    host: str
    port: int
    tls: TlsMode
    user: str
    trust_file: Path | None = None  # PEM the client must trust (a self-signed certificate)
    sender: str = "app@example.com"  # an address the tenant may send from
    recipient: str = "you@example.com"


SNIPPET_SUBJECT = "Hello from relayd"
SNIPPET_TEXT = "It works: this message went through relayd."


def sender_for(patterns: tuple[str, ...] | list[str]) -> str:
    """An address matching the first sender pattern, for a snippet's From; pure.

    `*@acme.example` gives `app@acme.example`, `*@*.acme.example`
    `app@mail.acme.example`, `*` `app@example.com`; an exact address is itself.
    """
    for pattern in patterns:
        if "*" not in pattern:
            return pattern
    pattern = patterns[0] if patterns else "*"
    local, at, domain = pattern.rpartition("@")
    if not at:
        local, domain = "*", pattern
    local = "app" if local in ("", "*") else local.replace("*", "app")
    if domain in ("", "*"):
        domain = "example.com"
    elif domain.startswith("*."):
        domain = "mail." + domain[2:]
    return f"{local}@{domain.replace('*', 'mail')}"


def _js(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _py(text: str) -> str:
    return repr(text)


def nodemailer_snippet(access: SubmissionAccess) -> str:
    """A complete Node.js program: `node send.js` with nodemailer installed."""
    secure = "true" if access.tls is TlsMode.IMPLICIT else "false"
    lines = [
        "const nodemailer = require('nodemailer');",
        "const transporter = nodemailer.createTransport({",
        f"  host: {_js(access.host)}, port: {access.port}, secure: {secure},",
        f"  auth: {{ user: {_js(access.user)}, pass: process.env.{PASSWORD_ENV} }},",
    ]
    if access.tls is TlsMode.STARTTLS:
        lines.append("  requireTLS: true,")
    if access.tls is TlsMode.NONE:
        lines.append("  ignoreTLS: true,  // a loopback listener without TLS")
    elif access.trust_file is not None:
        lines.append(f"  tls: {{ ca: require('fs').readFileSync({_js(str(access.trust_file))}) }},")
    lines += [
        "});",
        "transporter.sendMail({",
        f"  from: {_js(access.sender)}, to: {_js(access.recipient)},",
        f"  subject: {_js(SNIPPET_SUBJECT)}, text: {_js(SNIPPET_TEXT)},",
        "}).then(",
        "  (info) => console.log(info.response),",
        "  (err) => { console.error(err.message); process.exitCode = 1; },",
        ");",
    ]
    return "\n".join(lines)


def smtplib_snippet(access: SubmissionAccess) -> str:
    """A complete Python program: `python3 send.py`, standard library only."""
    cafile = f"cafile={_py(str(access.trust_file))}" if access.trust_file is not None else ""
    context = f"ssl.create_default_context({cafile})"
    if access.tls is TlsMode.IMPLICIT:
        opening = [f"with smtplib.SMTP_SSL({_py(access.host)}, {access.port}, context={context}) as s:"]
    else:
        opening = [f"with smtplib.SMTP({_py(access.host)}, {access.port}) as s:"]
        if access.tls is TlsMode.STARTTLS:
            opening.append(f"    s.starttls(context={context})")
    return "\n".join([
        "import os, smtplib, ssl",
        "from email.message import EmailMessage",
        "",
        "msg = EmailMessage()",
        f"msg[\"From\"] = {_py(access.sender)}",
        f"msg[\"To\"] = {_py(access.recipient)}",
        f"msg[\"Subject\"] = {_py(SNIPPET_SUBJECT)}",
        f"msg.set_content({_py(SNIPPET_TEXT)})",
        *opening,
        f"    s.login({_py(access.user)}, os.environ[{_py(PASSWORD_ENV)}])",
        "    s.send_message(msg)",
        "print(\"sent\")",
    ])


NODEMAILER_HEADING = "--- nodemailer: save as send.js, then `node send.js` ---"
SMTPLIB_HEADING = "--- Python smtplib: save as send.py, then `python3 send.py` ---"
SNIPPETS_END = "--- end ---"


def client_snippets(access: SubmissionAccess) -> str:
    """Both snippets, flush left between marker lines, so each pastes and runs as it is."""
    return (
        f"{NODEMAILER_HEADING}\n{nodemailer_snippet(access)}\n"
        f"{SMTPLIB_HEADING}\n{smtplib_snippet(access)}\n"
        f"{SNIPPETS_END}\n"
    )


def snippets_in(text: str) -> dict[str, str]:
    """The snippets printed by `client_snippets` inside `text`, by language ("js", "python")."""
    found: dict[str, str] = {}
    lines = text.splitlines()
    for key, heading in (("js", NODEMAILER_HEADING), ("python", SMTPLIB_HEADING)):
        if heading in lines:
            start = lines.index(heading) + 1
            end = start
            while end < len(lines) and not lines[end].startswith("--- "):
                end += 1
            found[key] = "\n".join(lines[start:end]) + "\n"
    return found
