"""Every reply relayd's SMTP listener can give, by name.

Each refusal is a code, an enhanced status code (RFC 3463) and a sentence a
human understands. The client sees only this text; the internal reason goes to
the log. Replies that need details are functions returning the full line.
"""

from __future__ import annotations

# Greeting and EHLO lines carry no enhanced code (RFC 2034 section 3).
OK = "250 2.0.0 OK"
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
START_DATA = "354 End data with <CR><LF>.<CR><LF>"
AUTH_OK = "235 2.7.0 Authentication successful"

AUTH_REQUIRED = "530 5.7.0 Authentication required: log in with AUTH before MAIL FROM"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required: issue STARTTLS before AUTH"
AUTH_ALREADY = "503 5.5.1 Already authenticated"
AUTH_MECHANISM_UNKNOWN = "504 5.5.4 Unrecognized authentication mechanism; use PLAIN or LOGIN"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode base64 authentication data"
AUTH_TOO_MANY = "421 4.7.0 Too many failed authentication attempts; try again later"
AUTH_SYNTAX = "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
AUTH_NEEDS_EHLO = "503 5.5.1 Send EHLO before AUTH"

NEED_MAIL = "503 5.5.1 Need MAIL FROM before RCPT TO"
NEED_RCPT = "503 5.5.1 Need RCPT TO before DATA"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients for one message; send the rest in another message"
MESSAGE_TOO_BIG = "552 5.3.4 Message exceeds the maximum size of {limit} bytes"
NO_NUL = "554 5.6.0 Message contains NUL bytes, which SMTP cannot carry"
SPOOL_FULL = "452 4.3.1 Insufficient system storage; try again later"
SPOOL_ERROR = "451 4.3.0 Temporary local problem while queueing the message; try again later"
INTERNAL_ERROR = "451 4.3.0 Temporary local problem; try again later"
TIMEOUT = "421 4.4.2 {host} Timeout exceeded; closing connection"
SHUTTING_DOWN = "421 4.3.2 {host} Service shutting down; try again later"
TOO_MANY_CONNECTIONS = "421 4.7.0 {host} Too many connections{scope}; try again later"
EVICTED = "421 4.7.0 {host} Too many connections; closing this idle unauthenticated one"
TOO_MANY_COMMANDS = "421 4.7.0 {host} Too many commands before authentication; closing connection"
TOO_MANY_ERRORS = "421 4.7.0 {host} Too many errors; closing connection"
DATA_TOO_SLOW = "421 4.4.2 {host} Message data arriving too slowly; closing connection"
BAD_HELO = (
    "501 5.5.2 Invalid {command} hostname: use a domain name or an address literal "
    "in printable ASCII"
)
BAD_ADDRESS = "553 5.1.3 Malformed address: {address}"
SMTPUTF8_NEEDED = "553 5.6.7 Address has non-ASCII characters; use SMTPUTF8"
NO_ROUTE = (
    "550 5.7.1 Relaying to <{address}> is not permitted for tenant {tenant}: no route matches"
)


def message_too_big(limit: int) -> str:
    return MESSAGE_TOO_BIG.format(limit=limit)


def line_too_long(line_number: int, limit: int) -> str:
    return (
        f"554 5.6.0 Line {line_number} of the message is longer than {limit} octets; "
        "wrap long lines or use quoted-printable/base64 encoding"
    )


def sender_not_allowed(address: str, tenant: str, where: str) -> str:
    shown = f"<{address}>" if address else "<> (empty)"
    return f"550 5.7.1 {where} {shown} is not an allowed sender for tenant {tenant}"


def no_route(address: str, tenant: str) -> str:
    return NO_ROUTE.format(address=address, tenant=tenant)


def bad_address(address: str) -> str:
    return BAD_ADDRESS.format(address=address)


def local_user_not_allowed(user: str) -> str:
    """A Unix-socket submission from a uid that no tenant lists in local_users."""
    return (
        f"550 5.7.1 Local user {user} may not submit mail here: no tenant lists it in "
        "local_users; ask the administrator"
    )


def queued(message_id: str) -> str:
    return f"250 2.0.0 OK id={message_id}"


def timeout(host: str) -> str:
    return TIMEOUT.format(host=host)


def shutting_down(host: str) -> str:
    return SHUTTING_DOWN.format(host=host)


def too_many_connections(host: str, *, from_address: bool) -> str:
    return TOO_MANY_CONNECTIONS.format(host=host, scope=" from your address" if from_address else "")


def too_many_commands(host: str) -> str:
    return TOO_MANY_COMMANDS.format(host=host)


def too_many_errors(host: str) -> str:
    return TOO_MANY_ERRORS.format(host=host)


def data_too_slow(host: str) -> str:
    return DATA_TOO_SLOW.format(host=host)


def bad_helo(command: str) -> str:
    return BAD_HELO.format(command=command)


def evicted(host: str) -> str:
    return EVICTED.format(host=host)
