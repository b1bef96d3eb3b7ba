"""Main-log lines: which line each event becomes, in the shape of Exim's mainlog; pure functions.

Takes: events (`relayd.observe.events`) and the values they carry. Emits: the
text of a line without its timestamp, such as ``1abc-000001 => x@gmail.com
R=acme T=gmail H=smtp.gmail.com [1.2.3.4]:587 X=TLS1.3 C="250 2.0.0 OK"``;
`format_event` is the one place that says which line each event becomes, and
`format_timestamp` the time in front of it. relayd.observe.mainlog writes them.
Untrusted input: addresses, HELO names, logins, upstream replies and client
data. Every such field goes through `sanitize()`, which escapes CR, LF and all
other non-printing characters and truncates the field, so no client or
upstream can forge or split a log line. Bodies and secrets are never passed in.
Fails: never; a field that cannot be shown as it is gets escaped.

Markers, as in Exim: ``<=`` arrival, ``=>`` delivery, ``->`` a further
recipient of the same delivery, ``==`` deferral, ``**`` permanent failure.
"""

from __future__ import annotations

import time

from relayd.observe import events as ev
from relayd.values import DeliveryReport, Envelope, QueueEntry

# Long enough for any real address or SMTP reply line, short enough that a
# hostile client cannot turn one event into megabytes of log.
MAX_FIELD = 512


_ESCAPES = {"\\": "\\\\", "\r": "\\r", "\n": "\\n", "\t": "\\t"}


def sanitize(text: str, limit: int = MAX_FIELD) -> str:
    """`text` made safe for one log line: escaped and cut to about `limit` characters.

    Backslash, CR, LF and tab become ``\\\\``, ``\\r``, ``\\n``, ``\\t``; any other
    non-printing character (controls, DEL, C1 controls, Unicode line and
    paragraph separators, format characters, undecodable surrogates) becomes
    ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``. A cut field ends in ``...``.
    """
    if len(text) <= limit and text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to escape, nothing to cut
    out: list[str] = []
    size = 0
    for ch in text:
        piece = _escape(ch)
        if size + len(piece) > limit:
            out.append("...")
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


def _escape(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    if ch == " " or ch.isprintable():
        return ch
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def format_timestamp(when: float, *, utc: bool) -> str:
    """Exim's ``YYYY-MM-DD HH:MM:SS``, in local time unless `utc`."""
    parts = time.gmtime(when) if utc else time.localtime(when)
    return time.strftime("%Y-%m-%d %H:%M:%S", parts)


def exim_tls(version: str) -> str:
    """The X= protocol name as Debian's Exim (GnuTLS) writes it: "TLS1.3", not "TLSv1.3".

    Used on arrival and delivery lines alike, so one grep finds both.
    """
    return version.replace("TLSv", "TLS")


# The OS error sentences relayd's transports end a reason with, as strerror(3)
# writes them. Exim ends a host-failure line with strerror's text, and
# eximstats names the reason only in that spelling (": Connection refused").
_STRERROR = {
    text.lower(): text
    for text in ("Connection refused", "Connection timed out", "Connection reset by peer",
                 "Network is unreachable", "No route to host", "Host is unreachable")
}


def _errstr(reason: str) -> str:
    head, sep, tail = reason.rpartition(": ")
    spelled = _STRERROR.get(tail.lower())
    return f"{head}{sep}{spelled}" if spelled is not None else reason


def format_arrival(
    entry: QueueEntry,
    *,
    client_ip: str,
    client_port: int,
    helo: str,
    protocol: str,
    tls: str | None,
    auth: str | None,
    user: str = "",
) -> str:
    """``<id> <= sender H=(helo) [ip]:port U=.. P=.. X=.. A=.. S=.. id=.. for r1 r2``.

    A local submission (Unix socket) has no H= and names the local user as
    ``U=uid/name``, as Exim's U= names the user who ran it.
    """
    env = entry.envelope
    tokens = [sanitize(entry.id), "<=", _sender(env.sender)]
    if client_ip:
        host = f"[{sanitize(client_ip)}]" + (f":{client_port}" if client_port else "")
        tokens.append(f"H=({sanitize(helo)}) {host}" if helo else f"H={host}")
    if user:
        tokens.append(f"U={sanitize(user)}")
    tokens.append(f"P={sanitize(protocol)}")
    if tls:
        tokens.append(f"X={sanitize(exim_tls(tls))}")
    if auth:
        tokens.append(f"A={sanitize(auth)}")
    tokens.append(f"S={env.size}")
    message_id = env.header_message_id.strip().strip("<>")
    if message_id:
        tokens.append(f"id={sanitize(message_id)}")
    recipients = [r.address for r in entry.recipients] or list(env.recipients)
    if recipients:
        tokens.append("for " + " ".join(sanitize(r) for r in recipients))
    return " ".join(tokens)


def format_delivered(queue_id: str, report: DeliveryReport, *, first: bool) -> str:
    """``<id> => addr R=rule T=transport H=host [ip]:port X=tls C="reply"``.

    `first` False gives ``->``: another recipient carried by the same
    upstream transaction.
    """
    tokens = [sanitize(queue_id), "=>" if first else "->", sanitize(report.address)]
    tokens += _route_tokens(report)
    host = _host(report.host, report.ip, report.port)
    if host:
        tokens.append(f"H={host}")
    if report.tls:
        tokens.append(f"X={sanitize(exim_tls(report.tls))}")
    if report.reply is not None:
        confirmation = sanitize(str(report.reply)).replace('"', '\\"')
        tokens.append(f'C="{confirmation}"')
    return " ".join(tokens)


def format_deferred(
    queue_id: str, report: DeliveryReport, *, next_attempt: float | None, utc: bool = False
) -> str:
    """``<id> == addr R=rule T=transport defer (-1) H=host [ip]:port: reason``.

    When the next attempt is known it is appended as ``next try <time>`` so
    an operator reading the log knows when the queue will act again.
    """
    tokens = [sanitize(queue_id), "==", sanitize(report.address)]
    tokens += _route_tokens(report)
    tokens.append("defer (-1)")
    host = _host(report.host, report.ip, report.port)
    if host:
        tokens.append(f"H={host}")
    line = " ".join(tokens) + ": " + _reason(report)
    if next_attempt is not None:
        line += f" (next try {format_timestamp(next_attempt, utc=utc)})"
    return line


def format_host_failed(
    queue_id: str, *, transport: str, host: str, ip: str, port: int, reason: str
) -> str:
    """``<id> H=host [ip]:port T=transport: reason`` for a transport skipped in failover.

    Exim's shape for a host that failed (its `write_logs`): the address in
    brackets even when the host is an IP literal, and the OS error in
    strerror's spelling, which is how eximstats recognises the reason.
    """
    if not ip and _is_ip_literal(host):
        ip = host
    where = _host(host, ip, port) or "[]"
    return f"{sanitize(queue_id)} H={where} T={sanitize(transport)}: {sanitize(_errstr(reason))}"


def _is_ip_literal(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def format_failed(queue_id: str, report: DeliveryReport) -> str:
    """``<id> ** addr R=rule T=transport H=host [ip]:port: reason``."""
    return f"{sanitize(queue_id)} ** {_failure_tail(report)}"


def format_completed(queue_id: str) -> str:
    """``<id> Completed``: every recipient reached a final state."""
    return f"{sanitize(queue_id)} Completed"


def format_bounce_created(
    queue_id: str, *, bounce_id: str, sender: str, size: int | None = None
) -> str:
    """``<bounce_id> <= <> R=<id> U=relayd P=local S=size for sender``.

    As in Exim, the bounce's own arrival line names the message it reports
    on with R=, so the two can be joined with one grep.
    """
    tokens = [sanitize(bounce_id), "<=", "<>", f"R={sanitize(queue_id)}", "U=relayd", "P=local"]
    if size is not None:
        tokens.append(f"S={size}")
    tokens.append(f"for {sanitize(sender)}")
    return " ".join(tokens)


def format_bounce_dropped(queue_id: str, report: DeliveryReport) -> str:
    """``<id> ** addr ...: reason (null sender: bounce discarded)``: a bounce is never bounced."""
    return f"{sanitize(queue_id)} ** {_failure_tail(report)} (null sender: bounce discarded)"


def format_bounce_suppressed(queue_id: str, *, sender: str, reason: str) -> str:
    """``<id> no bounce sent to <sender>: reason``: the failure is recorded, the DSN is not sent.

    Used for a message that was itself sent automatically (RFC 3834
    Auto-Submitted): answering it could start a mail loop between two robots.
    """
    return f"{sanitize(queue_id)} no bounce sent to {_sender(sender)}: {sanitize(reason)}"


def format_rejected(
    *, client_ip: str, stage: str, reply: str, detail: str = "", address: str | None = None
) -> str:
    """``H=[ip] rejected RCPT <addr>: reply: detail``.

    `reply` is what the client was told; `detail` is the internal reason,
    which only the log sees.
    """
    what = sanitize(stage)
    if address is not None:
        what += f" <{sanitize(address)}>"
    host = f"H=[{sanitize(client_ip)}] " if client_ip else ""  # none for a local (Unix socket) client
    line = f"{host}rejected {what}: {sanitize(reply)}"
    if detail:
        line += f": {sanitize(detail)}"
    return line


def format_auth_failed(
    *, client_ip: str, login: str | None, helo: str = "", mechanism: str = ""
) -> str:
    """Exim's ``authenticator failed for ([ip]) [ip]: 535 Incorrect authentication data``.

    The login the client tried is shown as set_id (never the password); the
    reply text is the same whether or not the login exists.
    """
    prefix = f"{sanitize(mechanism)} authenticator" if mechanism else "authenticator"
    ip = sanitize(client_ip)
    name = sanitize(helo) if helo else f"[{ip}]"
    line = f"{prefix} failed for ({name}) [{ip}]: 535 Incorrect authentication data"
    if login is not None:
        line += f" (set_id={sanitize(login)})"
    return line


def format_connection_refused(*, client_ip: str, reason: str, suppressed: int = 0) -> str:
    """Exim's ``Connection from [ip] refused: too many connections``, plus what was not logged."""
    line = f"Connection from [{sanitize(client_ip)}] refused: {sanitize(reason)}"
    return line + _suppressed_tail(suppressed)


def format_session_dropped(*, client_ip: str, reason: str) -> str:
    """Exim's ``SMTP call from [ip] dropped: too many syntax or protocol errors``."""
    return f"SMTP call from [{sanitize(client_ip)}] dropped: {sanitize(reason)}"


def format_rejections_suppressed(*, client_ip: str, count: int) -> str:
    """The summary of one connection's rejections that were counted but not logged."""
    return f"H=[{sanitize(client_ip)}] {count} further rejection(s) not logged"


def _suppressed_tail(suppressed: int) -> str:
    return f" ({suppressed} similar line(s) not logged)" if suppressed else ""


def format_auth_throttled(*, client_ip: str, login: str, reason: str, retry_after: float) -> str:
    """``H=[ip] AUTH refused (set_id=login): reason; retry in Ns: 421 4.7.0``.

    The login attempted is shown (sanitised), never a password; the client
    was told the same 421 whatever the reason and whether the login exists.
    """
    line = f"H=[{sanitize(client_ip)}] AUTH refused (set_id={sanitize(login, 128)}): {sanitize(reason)}"
    if retry_after > 0:
        line += f"; retry in {retry_after:.0f}s"
    return line + ": 421 4.7.0 Too many failed authentication attempts"


def format_daemon(text: str, *, level: str = "") -> str:
    """A daemon event (start, stop, reload, config error); `level` prefixes it."""
    return f"{level}: {sanitize(text)}" if level else sanitize(text)


_OPERATOR_VERBS = {
    "freeze": "frozen", "thaw": "unfrozen", "remove": "removed", "giveup": "delivery cancelled",
}


def format_operator_action(action: ev.OperatorAction) -> str:
    """``<id> frozen by <user>``; for a flush ``queue flush by <user>: N message(s) forced``."""
    if action.action == "flush":
        return sanitize(f"queue flush by {action.user}: {action.count} message(s) forced")
    verb = _OPERATOR_VERBS.get(action.action, action.action)
    return sanitize(f"{action.queue_id} {verb} by {action.user}")


def format_event(event: ev.Event, *, utc: bool = False) -> str | None:
    """The main log line for `event`, without its timestamp; None for an event the log does not show.

    The one place that decides the text log's shape for each event, so the
    file and the control socket's recent lines cannot drift apart.
    """
    if isinstance(event, ev.MessageArrived):
        env = event.entry.envelope
        return format_arrival(
            event.entry, client_ip=env.client_ip, client_port=env.client_port, helo=env.client_helo,
            protocol=env.protocol, tls=env.tls or None, auth=arrival_auth(env), user=env.local_user,
        )
    if isinstance(event, ev.RecipientDelivered):
        return format_delivered(event.queue_id, event.report, first=event.first)
    if isinstance(event, ev.RecipientDeferred):
        return format_deferred(event.queue_id, event.report, next_attempt=event.next_attempt, utc=utc)
    if isinstance(event, ev.RecipientFailed):
        if event.bounce_discarded:
            return format_bounce_dropped(event.queue_id, event.report)
        return format_failed(event.queue_id, event.report)
    if isinstance(event, ev.HostFailed):
        return format_host_failed(
            event.queue_id, transport=event.transport, host=event.host, ip=event.ip, port=event.port,
            reason=event.reason,
        )
    if isinstance(event, ev.MessageCompleted):
        return format_completed(event.queue_id)
    if isinstance(event, ev.BounceCreated):
        return format_bounce_created(event.queue_id, bounce_id=event.bounce_id, sender=event.sender, size=event.size)
    if isinstance(event, ev.BounceSuppressed):
        return format_bounce_suppressed(event.queue_id, sender=event.sender, reason=event.reason)
    return _format_session_event(event) or _format_daemon_event(event)


def _format_session_event(event: ev.Event) -> str | None:
    if isinstance(event, ev.SmtpRefused):
        if not event.logged:
            return None
        return format_rejected(
            client_ip=event.client_ip, stage=event.stage, reply=event.reply, detail=event.detail,
            address=event.address,
        )
    if isinstance(event, ev.RejectionsNotLogged):
        return format_rejections_suppressed(client_ip=event.client_ip, count=event.count)
    if isinstance(event, ev.AuthFailed):
        return format_auth_failed(client_ip=event.client_ip, login=event.login)
    if isinstance(event, ev.AuthThrottled):
        return format_auth_throttled(
            client_ip=event.client_ip, login=event.login, reason=event.reason, retry_after=event.retry_after
        )
    if isinstance(event, ev.ConnectionRefused):
        if not event.logged:
            return None
        return format_connection_refused(client_ip=event.client_ip, reason=event.reason, suppressed=event.suppressed)
    if isinstance(event, ev.SessionDropped):
        return format_session_dropped(client_ip=event.client_ip, reason=event.reason)
    return None


def _format_daemon_event(event: ev.Event) -> str | None:
    if isinstance(event, ev.OperatorAction):
        return format_operator_action(event)
    if isinstance(event, ev.SpoolRefusedMessage):
        what = "spool full" if event.full else "spool write failed"
        return format_daemon(f"{what}, message refused: {event.error}", level="error")
    if isinstance(event, ev.SpoolSetAside):
        return format_daemon(f"{event.queue_id} spool file set aside: {event.error}", level="error")
    if isinstance(event, ev.SpoolCannotRecord):
        return format_daemon(
            f"{event.queue_id} cannot record delivery state, delivery held until the spool can write: "
            f"{event.error}", level="error",
        )
    if isinstance(event, ev.SpoolRecovered):
        return format_daemon(f"{event.queue_id} delivery state recorded; the spool can write again")
    if isinstance(event, ev.IncompleteDiscarded):
        return format_daemon(f"{event.queue_id} incomplete message from a stopped receiver discarded")
    if isinstance(event, ev.DaemonStarted):
        return format_daemon(f"relayd started: listening on {event.listening}; loading the queue index")
    if isinstance(event, ev.DaemonStopping):
        return format_daemon("relayd stopping: no longer accepting connections")
    if isinstance(event, ev.DaemonStopped):
        return format_daemon("relayd stopped")
    if isinstance(event, ev.ConfigReloaded):
        return format_daemon(f"configuration reloaded from {event.source}")
    if isinstance(event, ev.Notice):
        return format_daemon(event.text, level=event.level)
    return None  # UpstreamAttempted, SessionOpened, SessionClosed: metrics only


def arrival_auth(env: Envelope) -> str:
    """Exim's A= value, `authenticator:id`: `plain:acme` or `login:acme` after SMTP AUTH,
    `local:cron` for a tenant known by the uid of a local user on the Unix socket
    (U= names the user), `bind:cron` for one known by its loopback address."""
    if env.auth_mechanism:
        return f"{env.auth_mechanism}:{env.tenant}"
    return f"{'local' if env.local_user else 'bind'}:{env.tenant}"


def _sender(address: str) -> str:
    return "<>" if address == "" else sanitize(address)


def _route_tokens(report: DeliveryReport) -> list[str]:
    tokens: list[str] = []
    if report.rule:
        tokens.append(f"R={sanitize(report.rule)}")
    if report.transport:
        tokens.append(f"T={sanitize(report.transport)}")
    return tokens


def _host(host: str, ip: str, port: int) -> str:
    """``host [ip]:port`` with whatever parts are known; "" when none are."""
    if not host and not ip:
        return ""
    address = f"[{sanitize(ip)}]" if ip else ""
    if address and port:
        address += f":{port}"
    if host:
        return f"{sanitize(host)} {address}".rstrip()
    return address


def _reason(report: DeliveryReport) -> str:
    if report.reason:
        return sanitize(report.reason)
    if report.reply is not None:
        return sanitize(f"SMTP error from remote mail server: {report.reply}")
    return "unknown error"


def _failure_tail(report: DeliveryReport) -> str:
    tokens = [sanitize(report.address)] + _route_tokens(report)
    host = _host(report.host, report.ip, report.port)
    if host:
        tokens.append(f"H={host}")
    return " ".join(tokens) + ": " + _reason(report)
