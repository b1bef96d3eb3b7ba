"""relayd-sendmail: the `sendmail` command for cron, PHP mail() and shell scripts.

Takes: sendmail-style arguments (-t, -i, -f, -F, recipients ...) and one
message on stdin. Where to submit: relayd's Unix socket (`--socket`, else
$RELAYD_SUBMIT_SOCKET, else the `unix:` listener of relay.yaml when this user
can read it, else /run/relayd/submit.sock). relayd reads the caller's uid from
the kernel and submits as the tenant whose `local_users` lists it, so no
password is needed, none is stored, and relay.yaml (which holds every tenant's
password hash) need not be readable by the caller. Only when relay.yaml has no
unix listener does it fall back to the older way: SMTP from the loopback
address of a tenant with `bind_addresses` (which trusts every local user).
Emits: the message, submitted over SMTP. Nothing on stdout; `-v` narrates on
stderr; each problem is one `relayd-sendmail: ...` line on stderr.
Untrusted input: the arguments and the message come from whoever runs the
command; relayd applies its own sender, recipient and content policy.
How it fails: with sendmail's exit codes (sysexits.h), never a traceback.
Nothing is lost: either relayd answered 250 to the message (it is on disk) or
the exit status is non-zero and the caller (cron, PHP) reports or retries.

Choices where sendmail implementations differ, written down once:
* `-t` adds the To/Cc/Bcc addresses to any given as arguments (Sendmail's
  and Postfix's behaviour; Exim subtracts them instead).
* A `Bcc:` header is never passed on, with or without `-t`.
* Without `-f`, the envelope sender is the message's own From: address when it
  has one, else `user@hostname` (the running user, relay.yaml's hostname).
  relayd checks both against the tenant's `senders`, so they had better agree.
* An address without a domain (cron's `MAILTO=root`) is qualified with
  relay.yaml's hostname, as Exim does.
* All or nothing: if relayd refuses any recipient, the transaction is reset
  and nothing is queued, so a retry by the caller cannot duplicate mail.

The command line is read in relayd.ops.sendmailargs, the message built in
relayd.ops.sendmailmsg; this module finds relayd and talks SMTP to it.
"""

from __future__ import annotations

import email.utils
import enum
import ipaddress
import os
import pwd
import re
import smtplib
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Mapping, Sequence, TextIO

from relayd.config.loader import ConfigError, load_config
from relayd.config.model import RelayConfig, TlsMode
from relayd.ops.sendmailargs import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    DEFAULT_SOCKET,
    PROG,
    SOCKET_ENV,
    USAGE,
    Exit,
    Failure,
    Options,
    parse_arguments,
)
from relayd.ops.sendmailmsg import Submission, build_submission, read_message
from relayd.smtp.policy import effective_limit

SMTP_TIMEOUT = 60.0  # seconds per SMTP step; relayd answers DATA once the spool has flushed


# ----------------------------------------------------------------- where to submit (pure)


@dataclass(frozen=True)
class Target:
    """The listener to connect to and the loopback address that stands for the tenant."""

    tenant: str
    host: str
    port: int
    source: str
    tls: TlsMode
    cert_file: Path | None
    hostname: str
    max_message_size: int = 25 * 1024 * 1024

    @property
    def where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def label(self) -> str:
        return f"tenant {self.tenant}"


@dataclass(frozen=True)
class LocalTarget:
    """relayd's Unix-socket listener; relayd picks the tenant from our uid."""

    path: Path
    hostname: str | None = None  # from relay.yaml when readable, else from relayd's greeting
    max_message_size: int | None = None  # likewise, else from EHLO SIZE
    user: str = ""

    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def label(self) -> str:
        return f"local user {self.user}" if self.user else "this local user"


def _connect_host(listen_address: str) -> str:
    """A wildcard listener is reached on loopback."""
    ip = ipaddress.ip_address(listen_address)
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return listen_address


def find_target(config: RelayConfig) -> Target:
    """The first listener and the first enabled tenant bound to a loopback address
    (the older way of local submission, which trusts every local user)."""
    bound = [t for t in config.tenants.values() if t.enabled and t.bind_addresses]
    if not bound:
        raise Failure(
            Exit.CONFIG,
            f"{config.source} has no unix listener, so relayd cannot tell who local mail is from; "
            "add one (`- {name: local, unix: /run/relayd/submit.sock}` under listeners:) and list "
            "the local users in the tenant's local_users, then restart relayd",
        )
    tenant = bound[0]
    listener = config.listeners[0]
    host = _connect_host(listener.address)
    family = ipaddress.ip_address(host).version
    sources = [a for a in tenant.bind_addresses if ipaddress.ip_address(a).version == family]
    if not sources:
        raise Failure(
            Exit.CONFIG,
            f"tenant {tenant.name} is bound to {', '.join(tenant.bind_addresses)} but the first "
            f"listener ({listener.name}) is on {listener.address}; bind the tenant to a loopback "
            f"address of the same family ({'::1' if family == 6 else '127.0.0.2'})",
        )
    cert = config.tls.cert_file if config.tls is not None and listener.tls is not TlsMode.NONE else None
    return Target(
        tenant=tenant.name, host=host, port=listener.port, source=sources[0], tls=listener.tls,
        cert_file=cert, hostname=config.hostname,
        max_message_size=effective_limit(listener.max_message_size, tenant.max_message_size),
    )


# ----------------------------------------------------------------- replies to exit codes (pure)


class Stage(enum.Enum):
    GREETING = "greeting"
    EHLO = "EHLO"
    STARTTLS = "STARTTLS"
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"


_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


def exit_for_reply(stage: Stage, code: int, text: str) -> Exit:
    """The exit status for a refusal from relayd.

    4xx anywhere: try again later (75). 5xx to RCPT: that recipient (67).
    530: relayd does not see this loopback address as the tenant (78).
    x.7.x (policy: sender or header From: not allowed): 77.
    x.1.x at MAIL, x.3.x and x.6.x (address syntax, size, content): 65.
    Anything else permanent: 69. A code SMTP does not allow here: 76.
    """
    if 400 <= code < 500:
        return Exit.TEMPFAIL
    if not 500 <= code < 600:
        return Exit.PROTOCOL
    if stage is Stage.RCPT:
        return Exit.NOUSER
    if code == 530:
        return Exit.CONFIG
    match = _ENHANCED.match(text)
    subject = match.group(2) if match else ""
    if subject == "7":
        return Exit.NOPERM
    if subject in ("3", "6") or (subject == "1" and stage is Stage.MAIL):
        return Exit.DATAERR
    return Exit.UNAVAILABLE


def _reply_text(code: int, message: bytes | str) -> str:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    return f"{code} {' '.join(text.split())}"


def _refusal(stage: Stage, code: int, message: bytes | str, what: str, target: Target | LocalTarget) -> Failure:
    reply = _reply_text(code, message)
    status = exit_for_reply(stage, code, reply[4:])
    if status is Exit.CONFIG and isinstance(target, Target):
        return Failure(
            status,
            f"relayd did not take {target.source} as tenant {target.tenant} ({reply}); reload relayd "
            "after changing bind_addresses; the message was not sent",
        )
    later = " (exit 75: cron/PHP will retry or report)" if status is Exit.TEMPFAIL else ""
    return Failure(status, f"relayd refused {what}: {reply}; the message was not sent{later}")


# ----------------------------------------------------------------- talking to relayd (I/O)


def tls_context(target: Target) -> ssl.SSLContext:
    """Trust exactly the listener certificate from relay.yaml (it may be self-signed).

    A loopback connection has no name worth checking, so the configured
    certificate file is the trust anchor (partial chains allowed, so a leaf
    from a public CA works too) and `check_pinned` then requires the very
    certificate the file holds.
    """
    assert target.cert_file is not None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(target.cert_file))
    except (OSError, ssl.SSLError) as exc:
        raise Failure(Exit.CONFIG, f"cannot use the listener certificate {target.cert_file}: "
                                   f"{_describe(exc)}; the message was not sent") from None
    return context


def configured_certificate(cert_file: Path) -> bytes:
    """DER of the first certificate in the PEM file (the listener's own)."""
    try:
        text = cert_file.read_text("ascii", "replace")
    except OSError as exc:
        raise Failure(Exit.CONFIG, f"cannot read the listener certificate {cert_file}: {_describe(exc)}; "
                                   "the message was not sent") from None
    end_marker = "-----END CERTIFICATE-----"
    start = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find(end_marker, start)
    if start < 0 or end < 0:
        raise Failure(Exit.CONFIG, f"{cert_file} holds no PEM certificate; the message was not sent")
    return ssl.PEM_cert_to_DER_cert(text[start:end + len(end_marker)] + "\n")


def check_pinned(client: smtplib.SMTP, target: Target) -> None:
    assert target.cert_file is not None and client.sock is not None
    presented = client.sock.getpeercert(binary_form=True) if isinstance(client.sock, ssl.SSLSocket) else None
    if presented != configured_certificate(target.cert_file):
        raise Failure(
            Exit.TEMPFAIL,
            f"the listener at {target.where} presented a certificate other than {target.cert_file}; "
            "if the certificate was just replaced, restart relayd; the message was not sent",
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def _unreachable(target: Target | LocalTarget, exc: BaseException) -> Failure:
    return Failure(
        Exit.TEMPFAIL,
        f"cannot reach relayd at {target.where}: {_describe(exc)}; the message was not sent "
        "(exit 75: cron/PHP will retry or report)",
    )


class Session:
    """One SMTP session with relayd, from the tenant's loopback address."""

    def __init__(self, target: Target | LocalTarget, *, verbose: TextIO | None,
                 timeout: float = SMTP_TIMEOUT) -> None:
        self.target = target
        self.verbose = verbose
        self.timeout = timeout

    def say(self, text: str) -> None:
        if self.verbose is not None:
            print(f"{PROG}: {text}", file=self.verbose)

    def open(self) -> smtplib.SMTP:
        t = self.target
        assert isinstance(t, Target)
        context = tls_context(t) if t.tls is TlsMode.IMPLICIT else None
        # local_hostname is given so smtplib never looks up this machine's name;
        # the host is given to the constructor, which connects and reads the greeting.
        client: smtplib.SMTP
        try:
            if t.tls is TlsMode.IMPLICIT:
                client = smtplib.SMTP_SSL(
                    t.host, t.port, local_hostname=t.hostname, timeout=self.timeout,
                    source_address=(t.source, 0), context=context,
                )
            else:
                client = smtplib.SMTP(
                    t.host, t.port, local_hostname=t.hostname, timeout=self.timeout, source_address=(t.source, 0),
                )
        except smtplib.SMTPConnectError as exc:
            raise _refusal(Stage.GREETING, exc.smtp_code, exc.smtp_error, "the connection", t) from None
        except ssl.SSLError as exc:
            raise Failure(Exit.TEMPFAIL, f"TLS with relayd at {t.where} failed: {_describe(exc)}; "
                                         "the message was not sent") from None
        except (OSError, smtplib.SMTPServerDisconnected) as exc:
            raise _unreachable(t, exc) from None
        self.say(f"connected to {t.where} from {t.source} (tenant {t.tenant})")
        return client

    def hello(self, client: smtplib.SMTP) -> None:
        t = self.target
        assert isinstance(t, Target)
        code, message = client.ehlo()
        if code != 250:
            raise _refusal(Stage.EHLO, code, message, "EHLO", t)
        if t.tls is TlsMode.STARTTLS:
            if not client.has_extn("starttls"):
                raise Failure(Exit.UNAVAILABLE, f"the listener at {t.where} does not offer STARTTLS although "
                                                "relay.yaml says it should; the message was not sent")
            assert t.cert_file is not None
            code, message = client.starttls(context=tls_context(t))
            if code != 220:
                raise _refusal(Stage.STARTTLS, code, message, "STARTTLS", t)
            code, message = client.ehlo()
            if code != 250:
                raise _refusal(Stage.EHLO, code, message, "EHLO", t)
        if t.tls is not TlsMode.NONE:
            check_pinned(client, t)
            assert isinstance(client.sock, ssl.SSLSocket)
            self.say(f"{client.sock.version()} with the certificate from {t.cert_file}")

    def transaction(self, client: smtplib.SMTP, submission: Submission) -> str:
        """MAIL, every RCPT, DATA; returns relayd's 250 reply. Any refused recipient aborts."""
        t = self.target
        options = _mail_options(client, submission)
        code, message = client.mail(submission.sender, options)
        if code != 250:
            raise _refusal(Stage.MAIL, code, message, f"the sender <{submission.sender}> ({t.label})", t)
        refused: list[tuple[str, int, bytes]] = []
        for recipient in submission.recipients:
            code, message = client.rcpt(recipient)
            if code not in (250, 251):
                refused.append((recipient, code, message))
        if refused:
            client.rset()
            raise _refused_recipients(refused, t)
        try:
            code, message = client.data(submission.message)
        except smtplib.SMTPDataError as exc:
            raise _refusal(Stage.DATA, exc.smtp_code, exc.smtp_error, "the message", t) from None
        if code != 250:
            raise _refusal(Stage.DATA, code, message, "the message", t)
        return _reply_text(code, message)


def _mail_options(client: smtplib.SMTP, submission: Submission) -> list[str]:
    options: list[str] = []
    if client.has_extn("size"):
        options.append(f"SIZE={len(submission.message)}")
    if not submission.message.isascii() and client.has_extn("8bitmime"):
        options.append("BODY=8BITMIME")
    if not all(a.isascii() for a in (submission.sender, *submission.recipients)):
        options.append("SMTPUTF8")
    return options


def _refused_recipients(refused: Sequence[tuple[str, int, bytes]], target: Target | LocalTarget) -> Failure:
    permanent = [r for r in refused if r[1] >= 500]
    first = (permanent or list(refused))[0]
    shown = "; ".join(f"<{a}>: {_reply_text(c, m)}" for a, c, m in refused)
    status = exit_for_reply(Stage.RCPT, first[1], "")
    later = " (exit 75: cron/PHP will retry or report)" if status is Exit.TEMPFAIL else ""
    return Failure(status, f"relayd refused {len(refused)} recipient(s): {shown}; "
                           f"the message was not sent to anyone{later}")


def submit(target: Target, submission: Submission, *, verbose: TextIO | None) -> str:
    """Hand the message to relayd; returns its 250 reply or raises `Failure`."""
    session = Session(target, verbose=verbose)
    client = session.open()
    try:
        session.hello(client)
        reply = session.transaction(client, submission)
    except (smtplib.SMTPServerDisconnected, smtplib.SMTPResponseException, OSError) as exc:
        raise _session_failure(exc, target) from None
    finally:
        _quit(client)
    session.say(f"queued: {reply}")
    return reply


def _session_failure(exc: BaseException, target: "Target | LocalTarget") -> Failure:
    """What a failed SMTP session with relayd means for the caller, with sendmail's exit code."""
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return Failure(Exit.TEMPFAIL, f"relayd at {target.where} closed the connection ({exc}); the message "
                                      "was not sent (exit 75: cron/PHP will retry or report)")
    if isinstance(exc, smtplib.SMTPResponseException):
        return _refusal(Stage.MAIL, exc.smtp_code, exc.smtp_error, "the session", target)
    if isinstance(exc, ssl.SSLError):
        return Failure(Exit.TEMPFAIL, f"TLS with relayd at {target.where} failed: {_describe(exc)}; "
                                      "the message was not sent")
    assert isinstance(exc, OSError)
    return _unreachable(target, exc)


def _quit(client: smtplib.SMTP) -> None:
    """Say goodbye; the message's fate was settled by the reply to DATA."""
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


# ----------------------------------------------------------------- main


def config_path(options: Options, environ: Mapping[str, str]) -> Path:
    if options.config is not None:
        return options.config
    from_env = environ.get(CONFIG_ENV, "")
    return Path(from_env) if from_env else DEFAULT_CONFIG


def local_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


def load_relay_config(path: Path) -> RelayConfig | None:
    """relay.yaml, or None when this user may not read it (the socket needs no config)."""
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        return None
    except OSError:
        pass  # load_config names the problem with the file
    try:
        return load_config(path, check_files=False)
    except ConfigError as exc:
        raise Failure(Exit.CONFIG, str(exc).replace("\n", f"\n{PROG}: ")) from None


def choose_target(options: Options, environ: Mapping[str, str]) -> tuple[Target | LocalTarget, RelayConfig | None]:
    """Where to submit, and relay.yaml if it was read: a socket named on the command
    line or in the environment, else what relay.yaml says (its unix listener, else a
    bind_addresses tenant), else the default socket when relay.yaml is unreadable or absent."""
    named = options.socket or (Path(environ[SOCKET_ENV]) if environ.get(SOCKET_ENV) else None)
    if named is not None:
        return LocalTarget(named, user=local_user()), None
    path = config_path(options, environ)
    explicit = options.config is not None or bool(environ.get(CONFIG_ENV))
    config = load_relay_config(path) if explicit or path.exists() else None
    if config is None:
        return LocalTarget(DEFAULT_SOCKET, user=local_user()), None
    for listener in config.listeners:
        if listener.unix_path is not None:
            target = LocalTarget(listener.unix_path, config.hostname, listener.max_message_size, local_user())
            return target, config
    return find_target(config), config


class UnixSMTP(smtplib.SMTP):
    """smtplib over relayd's Unix socket (smtplib only knows TCP, and LMTP's socket speaks LHLO)."""

    def __init__(self, path: Path, *, local_hostname: str, timeout: float) -> None:
        self.socket_path = path
        super().__init__(local_hostname=local_hostname, timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.socket_path))
        except OSError:
            sock.close()
            raise
        return sock


def open_local(target: LocalTarget, session: Session) -> tuple[smtplib.SMTP, str]:
    """Connect to the socket and say EHLO; the client and relayd's host name."""
    client = UnixSMTP(target.path, local_hostname=target.hostname or "localhost", timeout=session.timeout)
    try:
        code, greeting = client.connect()
    except PermissionError:
        client.close()
        raise Failure(Exit.NOPERM, f"{target.path}: permission denied; the unix listener's mode and group "
                                   "in relay.yaml decide who may connect; the message was not sent") from None
    except (OSError, smtplib.SMTPServerDisconnected) as exc:
        client.close()
        raise _unreachable(target, exc) from None
    if code != 220:
        client.close()
        raise _refusal(Stage.GREETING, code, greeting, "the connection", target)
    hostname = target.hostname or (greeting.split() or [b"localhost"])[0].decode("ascii", "replace")
    session.say(f"connected to {target.path} as {target.label}")
    code, message = client.ehlo()
    if code != 250:
        client.close()
        raise _refusal(Stage.EHLO, code, message, "EHLO", target)
    return client, hostname


def submit_local(target: LocalTarget, options: Options, *, stdin: BinaryIO, verbose: TextIO | None) -> str:
    """The whole submission over the Unix socket; relayd's 250 reply, or `Failure`."""
    session = Session(target, verbose=verbose)
    client, hostname = open_local(target, session)
    try:
        announced = client.esmtp_features.get("size", "")
        limit = int(announced) if announced.isdigit() else target.max_message_size or 25 * 1024 * 1024
        raw = read_message(stdin, dot_ends_input=options.dot_ends_input, limit=limit)
        submission = build_submission(
            raw, options, local_sender=f"{local_user()}@{hostname}", hostname=hostname, now=time.time(),
            message_id=email.utils.make_msgid(domain=hostname),
        )
        if len(submission.message) > limit:
            raise Failure(Exit.DATAERR, f"the message is {len(submission.message)} bytes; relayd accepts at "
                                        f"most {limit}; nothing was sent")
        reply = session.transaction(client, submission)
    except (smtplib.SMTPServerDisconnected, smtplib.SMTPResponseException, OSError) as exc:
        raise _session_failure(exc, target) from None
    finally:
        _quit(client)
    session.say(f"queued: {reply}")
    return reply


def run(options: Options, *, stdin: BinaryIO, stderr: TextIO, environ: Mapping[str, str]) -> int:
    target, config = choose_target(options, environ)
    verbose = stderr if options.verbose else None
    if isinstance(target, LocalTarget):
        submit_local(target, options, stdin=stdin, verbose=verbose)
        return Exit.OK
    assert config is not None  # a bind_addresses target comes from relay.yaml
    raw = read_message(stdin, dot_ends_input=options.dot_ends_input, limit=target.max_message_size)
    submission = build_submission(
        raw, options,
        local_sender=f"{local_user()}@{config.hostname}",
        hostname=config.hostname,
        now=time.time(),
        message_id=email.utils.make_msgid(domain=config.hostname),
    )
    if len(submission.message) > target.max_message_size:
        raise Failure(Exit.DATAERR, f"the message is {len(submission.message)} bytes; relayd accepts at most "
                                    f"{target.max_message_size} for tenant {target.tenant}; nothing was sent")
    submit(target, submission, verbose=verbose)
    return Exit.OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        options = parse_arguments(sys.argv[1:] if argv is None else argv)
        if options.show_help:
            sys.stdout.write(USAGE)
            return Exit.OK
        return run(options, stdin=sys.stdin.buffer, stderr=sys.stderr, environ=os.environ)
    except Failure as failure:
        print(f"{PROG}: {failure.message}", file=sys.stderr)
        if failure.code is Exit.USAGE:
            print(f"{PROG}: see `{PROG} --help`", file=sys.stderr)
        return int(failure.code)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the message was not sent", file=sys.stderr)
        return int(Exit.TEMPFAIL)
    except Exception as exc:  # a bug: say what, keep the exit status meaningful
        print(f"{PROG}: internal error ({type(exc).__name__}: {exc}); the message was not sent", file=sys.stderr)
        return int(Exit.SOFTWARE)


if __name__ == "__main__":
    raise SystemExit(main())
