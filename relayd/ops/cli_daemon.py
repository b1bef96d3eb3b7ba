"""relayctl's verbs about the running relayd: reload, status and send-test.

Takes: relay.yaml, the running relayd's control socket, and for send-test a
tenant's password (no-echo prompt or stdin) and relayd's own listener.
Emits: one-line results or a status table (`--json` for scripts) on stdout;
send-test submits one test message over SMTP and follows it through the
daemon's recent events (`queue.outcome`), never by reading the log file.
Untrusted input: the daemon's answers (sanitised for the terminal), the
listener's SMTP replies, the password (sent only to relayd's own listener).
Fails: with one `relayctl: sentence` line per problem, never a traceback;
send-test exits 1 unless the message was delivered (or captured).
"""

from __future__ import annotations

import argparse
import email.utils
import json
import re
import smtplib
import ssl
import time
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING

from relayd.config.model import CaptureTransportConfig, RelayConfig, TenantConfig, TlsMode
from relayd.delivery import verifyrecord
from relayd.delivery.router import route
from relayd.jsonwire import JsonObject, as_int, as_list, as_object, as_objects, scalar_fields
from relayd.netaddr import is_loopback
from relayd.ops.clicommon import EXIT_FAILURE, EXIT_OK, PROG, CliError, UsageError, load_relay_config, read_password
from relayd.ops.controlclient import ControlUnavailable, DaemonNotRunning
from relayd.ops.queuesource import checked, control_client, offline_entries
from relayd.ops.queueview import sanitize, status_lines, transport_state
from relayd.queue.queuewire import queue_counts

if TYPE_CHECKING:
    from relayd.ops.clicommon import Subparsers

SEND_TEST_TIMEOUT = 60.0
SEND_TEST_POLL = 0.25
_QUEUE_ID = re.compile(r"id=([0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2})")


def cmd_reload(args: argparse.Namespace) -> int:
    try:
        config = load_relay_config(args)
    except CliError as exc:  # relayd would refuse it the same way; say where, without asking it
        raise CliError(f"not reloading: relayd would keep its running configuration:\n{exc.message}") from None
    try:
        reply = control_client(config).request("reload")
    except ControlUnavailable as exc:
        raise CliError(f"{exc}; nothing to reload") from None
    if not reply.get("ok"):
        problems = as_list(reply.get("problems")) or str(reply.get("error", "reload failed")).splitlines()
        raise CliError("relayd kept its running configuration:\n" + "\n".join(str(p) for p in problems))
    print(f"relayd reloaded its configuration from {reply.get('config', config.source)}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    try:
        status = checked(control_client(config).request("status"))
    except DaemonNotRunning as why:
        if args.json:
            entries = offline_entries(config, why)
            counts = queue_counts(entries, (), time.time())
            print(json.dumps({"running": False, "queue": counts.as_json()}, indent=1))
            return EXIT_FAILURE
        raise CliError(str(why)) from None
    except ControlUnavailable as exc:
        raise CliError(str(exc)) from None
    status.pop("done", None)
    status.pop("ok", None)
    _add_verify_results(config, status)
    if args.json:
        print(json.dumps({"running": True, **status}, indent=1))
    else:
        print("\n".join(status_lines(status, time.time())))
    return EXIT_OK


def _add_verify_results(config: RelayConfig, status: JsonObject) -> None:
    """Each transport's state word and its last `transport verify` result, beside the daemon's view."""
    verified = verifyrecord.read(config.spool_dir)
    transports = as_object(status.setdefault("transports", {}))
    for name in set(config.transports) | set(transports):
        entry = as_object(transports.setdefault(name, {}))
        entry["state"] = transport_state(entry)
        record = verified.get(name)
        entry["last_verify"] = scalar_fields(record) if record is not None else None


# --------------------------------------------------------------- send-test


def _default_sender(tenant: TenantConfig, hostname: str) -> str:
    """An address the tenant may use: an exact one, else relayd-test@ its first *@domain,
    else (a tenant that may send as anyone) relayd-test@ relay.yaml's hostname."""
    for pattern in tenant.senders:
        if "*" not in pattern:
            return pattern
    for pattern in tenant.senders:
        if pattern.startswith("*@") and "*" not in pattern[2:]:
            return f"relayd-test@{pattern[2:]}"
    if "*" in tenant.senders or "*@*" in tenant.senders:
        return f"relayd-test@{hostname}"
    raise UsageError(f"tenant {tenant.name} has no concrete sender pattern; give --from ADDRESS")


def _connect_host(address: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address, address)


def _tls_context(config: RelayConfig, host: str) -> ssl.SSLContext:
    """On loopback, trust exactly relayd's own certificate; elsewhere the system CAs."""
    if is_loopback(host) and config.tls is not None:
        context = ssl.create_default_context(cafile=str(config.tls.cert_file))
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        # The listener's own certificate is the only trust anchor, so the name
        # in it (often the public host name, not 127.0.0.1) need not match.
        context.check_hostname = False
        return context
    return ssl.create_default_context()


def _listener_port(config: RelayConfig) -> tuple[str, int]:
    first = config.listeners[0]
    try:
        reply = control_client(config).request("status")
        bound = as_objects(reply.get("listeners"))
        if reply.get("ok") and bound:
            return _connect_host(str(bound[0]["address"])), as_int(bound[0]["port"])
    except ControlUnavailable:
        pass
    return _connect_host(first.address), first.port


def _test_message(sender: str, recipient: str, hostname: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = "relayd send-test"
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid("send-test", domain=hostname)
    msg.set_content(f"A test message sent with `{PROG} send-test` through relayd on {hostname}.\n")
    return msg


def _submit(
    config: RelayConfig, tenant: TenantConfig, sender: str, recipient: str, password: str | None,
    source: str | None,
) -> str:
    """Submit one message to the first listener; returns relayd's queue id."""

    listener = config.listeners[0]
    host, port = _listener_port(config)
    source_address = (source, 0) if source else None
    context = _tls_context(config, host)
    message = _test_message(sender, recipient, config.hostname).as_bytes(
        policy=EmailMessage().policy.clone(linesep="\r\n")
    )
    client: smtplib.SMTP
    if listener.tls is TlsMode.IMPLICIT:
        client = smtplib.SMTP_SSL(host, port, timeout=30, context=context, source_address=source_address)
    else:
        client = smtplib.SMTP(host, port, timeout=30, source_address=source_address)
    with client:
        client.ehlo(config.hostname)
        if listener.tls is TlsMode.STARTTLS:
            client.starttls(context=context)
            client.ehlo(config.hostname)
        if password is not None:
            client.login(tenant.name, password)
        for step, reply in (("MAIL", client.mail(sender)), ("RCPT", client.rcpt(recipient))):
            if reply[0] != 250:
                raise CliError(f"relayd refused {step}: {reply[0]} {sanitize(reply[1].decode('utf-8', 'replace'))}")
        code, text = client.data(message)
    answer = text.decode("utf-8", "replace")
    found = _QUEUE_ID.search(answer)
    if code != 250 or found is None:
        raise CliError(f"relayd refused the message: {code} {sanitize(answer)}")
    return found.group(1)


def _follow(config: RelayConfig, message_id: str, recipient: str, timeout: float) -> tuple[str, str] | None:
    """Ask relayd until the recipient is delivered, deferred or failed (or the message left the queue).

    relayd answers from the events it keeps in memory, never from its log file.
    """
    deadline = time.monotonic() + timeout
    client = control_client(config)
    while True:
        try:
            reply = client.request("queue.outcome", id=message_id, recipient=recipient)
        except ControlUnavailable as exc:
            raise CliError(str(exc)) from None
        if not reply.get("ok"):
            raise CliError(f"relayd could not say what became of {message_id}: {reply.get('error', 'no answer')}")
        outcome = reply.get("outcome")
        if isinstance(outcome, str):
            return outcome, str(reply.get("detail", ""))
        if time.monotonic() >= deadline:
            return None
        time.sleep(SEND_TEST_POLL)


def captured_file(config: RelayConfig, tenant: TenantConfig, recipient: str, queue_id: str) -> Path | None:
    """The Maildir file a capture transport on the recipient's route wrote for `queue_id`.

    The capture transport ends each file name with the queue id, so this is a
    glob of new/ and cur/, not a read of every message.
    """
    found = route(tenant, recipient)
    for name in found.transports if found is not None else ():
        transport = config.transports.get(name)
        if isinstance(transport, CaptureTransportConfig):
            for sub in ("new", "cur"):
                for path in sorted((transport.maildir / sub).glob(f"*.{queue_id}*")):
                    return path
    return None


def _submit_failure(exc: BaseException) -> str:
    """Why the submission failed, in words: `connection refused`, not `[Errno 111] ...`."""
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.strerror:
        reason = exc.strerror[:1].lower() + exc.strerror[1:]
        if isinstance(exc, (ConnectionRefusedError, FileNotFoundError)):
            return f"{reason} (is relayd running? `{PROG} status` says)"
        return sanitize(reason)
    return sanitize(str(exc) or type(exc).__name__)


def cmd_send_test(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    tenant = config.tenants.get(args.tenant)
    if tenant is None:
        raise CliError(f"no tenant named {args.tenant!r} in {config.source}")
    recipient = args.to
    sender = args.sender or _default_sender(tenant, config.hostname)
    host, port = _listener_port(config)
    bound = [a for a in tenant.bind_addresses if is_loopback(a)] if is_loopback(host) else []
    source = bound[0] if bound else None
    password = None if source else read_password(args, f"Password of tenant {tenant.name}: ", confirm=False)
    try:
        message_id = _submit(config, tenant, sender, recipient, password, source)
    except smtplib.SMTPAuthenticationError:
        raise CliError(f"relayd refused the login of tenant {tenant.name} (wrong password?)") from None
    except (smtplib.SMTPException, ssl.SSLError, OSError) as exc:
        raise CliError(f"could not submit to relayd at {host}:{port}: {_submit_failure(exc)}") from None
    print(f"queued as {message_id}; following it for up to {args.timeout:g}s")
    found = _follow(config, message_id, recipient, args.timeout)
    if found is None:
        raise CliError(f"no outcome for {message_id} within {args.timeout:g}s; see `{PROG} queue show {message_id} --log`")
    outcome, detail = found
    captured = captured_file(config, tenant, recipient, message_id) if outcome in ("delivered", "completed") \
        else None
    if captured is not None:
        print(f"delivered (captured as {captured})")
        return EXIT_OK
    print(f"{outcome}: {sanitize(detail, limit=2048)}")
    return EXIT_OK if outcome == "delivered" else EXIT_FAILURE


def add_daemon_commands(subparsers: Subparsers) -> None:
    """The top-level `reload`, `status` and `send-test`."""
    p = subparsers.add_parser(
        "reload", help="re-read relay.yaml in the running relayd (like SIGHUP)",
        description="Check relay.yaml, then have the running relayd re-read it. All or nothing: on a "
        "problem relayd keeps its running configuration and the problem is printed as FILE:LINE:COL.",
    )
    p.set_defaults(func=cmd_reload)

    p = subparsers.add_parser(
        "status", help="the running relayd: listeners, queue, transports",
        description="The running relayd: its listeners, the queue by state and its oldest message, and per "
        "transport its state (ok, failing, unused, retry wait), last success, last error and last "
        "`relayctl transport verify` result. Exit status 1 when relayd is not running.",
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser(
        "send-test", help="send a test message through relayd and follow it",
        description="Submit one test message to relayd's first listener as a tenant (with its password, "
        "or from its bound loopback address), then follow it until it is delivered, deferred or failed. "
        "Exit status 0 when delivered (or captured by a capture transport), else 1.",
    )
    p.add_argument("--tenant", required=True, help="the tenant to submit as")
    p.add_argument("--to", required=True, metavar="ADDRESS", help="the recipient of the test message")
    p.add_argument("--from", dest="sender", metavar="ADDRESS", help="default: an allowed sender of the tenant")
    p.add_argument("--password-stdin", action="store_true", help="read the tenant's password as one line of stdin")
    p.add_argument("--timeout", type=float, default=SEND_TEST_TIMEOUT, metavar="SECONDS",
                   help=f"how long to follow the message (default {SEND_TEST_TIMEOUT:g}s)")
    p.set_defaults(func=cmd_send_test)
