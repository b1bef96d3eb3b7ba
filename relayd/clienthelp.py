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

from relayd.config import TlsMode

PASSWORD_ENV = "SMTP_PASSWORD"


@dataclass(frozen=True, slots=True)
class SubmissionAccess:
    """What an application needs to reach one listener as one tenant."""

    host: str
    port: int
    tls: TlsMode
    user: str
    trust_file: Path | None = None  # PEM the client must trust (a self-signed certificate)


def _js(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _py(text: str) -> str:
    return repr(text)


def nodemailer_snippet(access: SubmissionAccess) -> str:
    secure = "true" if access.tls is TlsMode.IMPLICIT else "false"
    lines = [
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
    lines.append("});")
    return "\n".join(lines)


def smtplib_snippet(access: SubmissionAccess) -> str:
    cafile = f"cafile={_py(str(access.trust_file))}" if access.trust_file is not None else ""
    context = f"ssl.create_default_context({cafile})"
    login = f"    s.login({_py(access.user)}, os.environ[{_py(PASSWORD_ENV)}])"
    if access.tls is TlsMode.IMPLICIT:
        opening = [f"with smtplib.SMTP_SSL({_py(access.host)}, {access.port}, context={context}) as s:"]
    else:
        opening = [f"with smtplib.SMTP({_py(access.host)}, {access.port}) as s:"]
        if access.tls is TlsMode.STARTTLS:
            opening.append(f"    s.starttls(context={context})")
    return "\n".join(["import os, smtplib, ssl", *opening, login, "    s.send_message(msg)"])


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def client_snippets(access: SubmissionAccess) -> str:
    """Both snippets under their headings, indented for a terminal."""
    return (
        f"nodemailer:\n{_indent(nodemailer_snippet(access))}\n\n"
        f"Python smtplib:\n{_indent(smtplib_snippet(access))}\n"
    )
