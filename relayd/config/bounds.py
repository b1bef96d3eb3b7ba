"""The bounds of relay.yaml's numbers, sizes and durations, one place for every section.

Each is (minimum, maximum) and is repeated in the comments of config/relay.yaml;
a value outside its bounds is a config error at its line and column.
"""

from __future__ import annotations

# Bounds: (minimum, maximum). Each is repeated in the comments of config/relay.yaml.
PORT = (1, 65535)
RECIPIENTS = (1, 10000)
MESSAGE_SIZE = (1024, 1024**3)  # 1K-1G
TIMEOUT = (1.0, 3600.0)  # 1s-1h
LINE_LENGTH = (998, 65536)  # RFC 5322 allows 998; refusing less would refuse valid mail
HEADER_SIZE = (8 * 1024, 1024**2)  # 8K-1M: enough for real headers, bounded memory per session
RECEIVED_HEADERS = (10, 1000)  # a message rarely crosses more than a dozen relays
AUTH_FAILURES = (1, 10000)
AUTH_WINDOW = (60.0, 86400.0)  # 1m-1d
CLIENT_CONNECTIONS = (1, 100000)  # descriptors: see relayd.smtp.fdlimit
COMMANDS_BEFORE_AUTH = (4, 10000)  # EHLO, STARTTLS, EHLO, AUTH
ERROR_LIMIT = (1, 10000)
DATA_RATE = (1, 1024**3)  # bytes per second
AUTH_SOURCE_BUDGET = (1, 100000)
AUTH_LOCKOUT = (1.0, 86400.0)  # 1s-1d
UID = (0, 2**32 - 2)  # (uid_t)-1 means "no user"
PARALLEL = (1, 1000)
QUEUE_RUN = (1.0, 3600.0)
SHUTDOWN_GRACE = (0.0, 3600.0)
CONNECTIONS = (1, 1000)
MESSAGES_PER_CONNECTION = (1, 100000)
IDLE = (0.0, 3600.0)  # 0: close the upstream connection after each message
SPOOL_BYTES = (0, 1024**4)  # 0-1024G
TENANT_MESSAGES = (1, 10_000_000)
REFRESH_MARGIN = (30.0, 1800.0)  # a token lives about an hour; refresh 30s-30m before it ends
TOKEN_TIMEOUT = (1.0, 300.0)  # one OAuth token request
WEBHOOK_PENDING = (10, 10_000_000)  # events waiting per endpoint before the oldest is dropped
WEBHOOK_RETRY = (0.1, 86400.0)  # 0.1s-1d
WEBHOOK_TIMEOUT = (0.5, 300.0)  # 0.5s-5m
WEBHOOK_IN_FLIGHT = (1, 100)
