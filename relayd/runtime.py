"""The relayd process around the composition root: command line, hardening, the dev default, the event loop.

Takes: argv and the environment (through `relayd.daemon.main`).
Emits: the parsed arguments, the environment the daemon keeps (the master key
only there), a ready development configuration, the daemon's exit status.
Untrusted input: the command line and the development state directory (read
through relayd.ops.devdefault and the config loader, which report errors as
sentences).
Fails: `prepare_dev_config` returns a sysexits status after printing one line
to stderr; the others do not fail (a libc without mallopt is left as it is).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Awaitable, Protocol

from relayd import hardening
from relayd.config.credentials import MASTER_KEY_ENV, CredentialStore, load_master_keys
from relayd.config.loader import ConfigError, load_config
from relayd.config.model import RelayConfig
from relayd.config.quota import DEFAULT_LOCAL_SHARE
from relayd.delivery.sharedcaps import SharedCaps
from relayd.observe.rediscounters import RedisCounters
from relayd.ops.devdefault import (
    DEFAULT_PORT,
    DevError,
    check_port_free,
    check_port_option,
    connection_help,
    dev_password,
    prepare_dev,
)


def fix_malloc_mmap_threshold() -> None:
    """Pin glibc's mmap threshold at 128 KiB (its initial value).

    glibc raises the threshold each time a large block is freed; with many TLS
    sessions reading in large chunks, those blocks then come from the heap,
    which fragments and is never given back (measured: 230 MB after 2,000
    STARTTLS sessions, 140-160 MB with the threshold pinned). Pinning it is
    what MALLOC_MMAP_THRESHOLD_=131072 does; nothing happens on other libcs.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 128 * 1024)
    except (OSError, AttributeError):
        pass


def run_event_loop(main: Coroutine[object, None, int]) -> int:
    """Run `main` to its exit status on uvloop, the loop production uses (plain asyncio without it)."""
    try:
        import uvloop  # optional speed-up; plain asyncio works the same

        return int(uvloop.run(main))
    except ImportError:
        return int(asyncio.run(main))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relayd", description="SMTP relay daemon")
    parser.add_argument(
        "--config", type=Path,
        default=Path(os.environ.get("RELAYD_CONFIG", "/etc/relayd/relay.yaml")),
        help="the YAML configuration (default: $RELAYD_CONFIG or /etc/relayd/relay.yaml)",
    )
    sub = parser.add_subparsers(dest="command")
    dev = sub.add_parser(
        "dev", help="run on the embedded development default (capture only)",
        description="A capture-only relay on 127.0.0.1 for development: every message lands in a "
        "Maildir, nothing leaves the machine. The state directory keeps the key, certificate, "
        "password and relay.yaml across restarts.",
    )
    dev.add_argument("--dir", type=Path, default=Path(os.environ.get("RELAYD_DEV_DIR", ".relayd-dev")),
                     help="the state directory (default: $RELAYD_DEV_DIR or ./.relayd-dev)")
    dev.add_argument("--port", type=int, default=None,
                     help="the submission port on 127.0.0.1 for a new relay.yaml (default 2525)")
    dev.add_argument("--reset", action="store_true",
                     help="write a fresh relay.yaml, dropping hand edits (key, certificate and password stay)")
    return parser


def harden_process() -> dict[str, str]:
    """No core dumps; the master key out of the environment. Returns the environment to use.

    The key stays only in the returned mapping (the daemon needs it again
    for a reload), not in os.environ, not in libc's environ and not in
    /proc/PID/environ.
    """
    key_text = hardening.take_from_environment(MASTER_KEY_ENV)
    hardening.disable_core_dumps()
    environ = dict(os.environ)
    if key_text is not None:
        environ[MASTER_KEY_ENV] = key_text
    return environ


def prepare_dev_config(args: argparse.Namespace) -> RelayConfig | int:
    """Prepare the dev directory, check its port, print the banner; an int is an exit status."""
    try:
        kept = not args.reset and (args.dir / "relay.yaml").exists()
        if not kept:  # nothing written yet: a busy port must not end up in a fresh relay.yaml
            check_port_free("127.0.0.1", args.port or DEFAULT_PORT)
        config_path = prepare_dev(args.dir, port=args.port, reset=args.reset)
        config = load_config(config_path)
        if kept:
            check_port_option(config, args.port)
        first = config.listeners[0]
        check_port_free(first.address, first.port, config_path if kept else None)
    except ConfigError as error:
        print(f"{error}\nrelayd: start with --reset to write a fresh development relay.yaml", file=sys.stderr)
        return 78
    except DevError as error:
        print(f"relayd: {error}", file=sys.stderr)
        return 69  # EX_UNAVAILABLE
    except OSError as error:  # the state directory cannot be created or read
        print(f"relayd: {error.filename or args.dir}: {error.strerror or error}", file=sys.stderr)
        return 73  # EX_CANTCREAT
    sys.stdout.write(connection_help(config, args.dir, dev_password(args.dir.resolve())))
    sys.stdout.flush()
    return config


def make_server_tls_context(config: RelayConfig) -> ssl.SSLContext | None:
    """The listeners' TLS context (TLS 1.2 or later), or None when relay.yaml has no tls:."""
    if config.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(config.tls.cert_file), str(config.tls.key_file))
    return context


class SignalledDaemon(Protocol):
    """What the signals ask of the daemon: stop, reload relay.yaml, reopen the logs."""

    def stop(self) -> Awaitable[None]: ...
    def reload(self) -> Awaitable[bool]: ...
    def reopen_logs(self) -> None: ...


def install_signals(daemon: SignalledDaemon, loop: asyncio.AbstractEventLoop) -> None:
    """SIGTERM/SIGINT stop once (a repeat does not start a second stop), SIGHUP reloads,
    SIGUSR1 reopens the logs (logrotate's postrotate)."""
    stopping: list[asyncio.Future[None]] = []

    def on_term() -> None:
        if not stopping:
            stopping.append(asyncio.ensure_future(daemon.stop(), loop=loop))

    def on_hup() -> None:
        asyncio.ensure_future(daemon.reload(), loop=loop)

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_term)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGUSR1, daemon.reopen_logs)


def shared_caps(
    store: RedisCounters | None, config: Callable[[], RelayConfig], warn: Callable[[str], None]
) -> SharedCaps | None:
    """The transports' caps shared through the usage store, when that is Redis (None: this node alone)."""
    if store is None:
        return None

    def local_share() -> float:
        redis = config().usage.redis
        return redis.local_share if redis is not None else DEFAULT_LOCAL_SHARE

    return SharedCaps(store, store.where, local_share=local_share, on_change=warn)


def open_credentials(config: RelayConfig, environ: Mapping[str, str]) -> CredentialStore | None:
    """The encrypted store, when the configuration names a secret or the file exists (None: nothing to open)."""
    needed = (config.metrics.status_auth is not None or bool(config.webhooks.endpoints)
              or any(getattr(t, "credential", None) for t in config.transports.values()))
    if not needed and not config.credentials.store.exists():
        return None
    return CredentialStore.open(config.credentials.store, load_master_keys(config.credentials, environ))
