"""The servers under test: relayd, Postfix and Exim, each configured alike, started and stopped.

Takes: a work directory, a submission port, the upstream sink's port, the TLS
files and the bench login. Emits: configuration files, running server
processes (each in its own process group for CPU and memory accounting), the
command that lists each server's queue, and the list of what was tuned.
Untrusted input: none; every file here is written by the harness.
How it fails: a server that does not answer 220 within its start-up limit
raises `PeerError` with the tail of its log.

"Configured alike": each accepts mail from 127.0.0.1 without AUTH and from
other loopback addresses with STARTTLS + AUTH PLAIN, keeps its queue on disk
with its default durability (fsync before 250), and relays everything to one
upstream on 127.0.0.1 without TLS. Each runs under a private mount namespace
whose /etc/resolv.conf names 127.0.0.1 only (when `unshare` works), so a stray
DNS lookup fails at once instead of waiting on a resolver.
"""

from __future__ import annotations

import os
import grp
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

from relaybench.measure import ProcessGroup

ROOT = Path(__file__).resolve().parents[2]
VENV_PY = ROOT / ".venv" / "bin" / "python"
_STOP_WAIT = 20.0  # seconds a server gets to stop on SIGTERM before SIGKILL


class PeerError(Exception):
    """A server could not be configured or started."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def isolation_works(work: Path) -> bool:
    """Can we run a command with a private /etc/resolv.conf? (needs root and mount namespaces)."""
    resolv = private_resolv(work)
    try:
        out = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             f"mount --bind {resolv} /etc/resolv.conf && cat /etc/resolv.conf"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "127.0.0.1" in out.stdout


def private_resolv(work: Path) -> Path:
    path = work / "resolv.conf"
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        path.write_text("# relaybench: servers under test resolve nothing beyond loopback\n"
                        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        path.chmod(0o644)
    return path


def wait_banner(port: int, timeout: float) -> float:
    """Seconds until the port answers with a 220 greeting; raises PeerError at the limit."""
    start = time.perf_counter()
    deadline = start + timeout
    while time.perf_counter() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.settimeout(5)
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.02)
    raise PeerError(f"nothing answered 220 on port {port} within {timeout:.0f}s")


class Peer:
    """One server under test. Subclasses write the config and name the command."""

    name = "peer"

    def __init__(self, work: Path, *, port: int, sink_port: int, tls_dir: Path,
                 password: str, isolate: bool) -> None:
        self.dir = work / self.name
        self.port = port
        self.sink_port = sink_port
        self.tls_dir = tls_dir
        self.password = password
        self.isolate = isolate
        self.resolv = private_resolv(work)
        self.group = ProcessGroup(self.name)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.tuning: list[str] = []
        self.queue_only = False

    # -- to be provided by each server -------------------------------------------

    def prepare(self) -> None:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def queue_list_command(self) -> list[str] | None:
        raise NotImplementedError

    def spool_paths(self) -> list[Path]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def before_start(self) -> None:
        """Anything a server needs on disk before each start (Postfix: its queue directories)."""

    def log_mark(self) -> int:
        """A position in the server's log, for `wait_fully_started`."""
        return 0

    def wait_fully_started(self, mark: int, timeout: float) -> float | None:
        """Seconds the server itself reports for finishing its start-up work after answering 220
        (relayd loads its queue index in the background); None when there is no such step."""
        return None

    # -- lifecycle ---------------------------------------------------------------

    def launch_command(self) -> list[str]:
        script = ""
        if self.group.method == "cgroup":
            script += f"echo $$ > {self.group.path / 'cgroup.procs'} && "
        if self.isolate:
            script += f"mount --bind {self.resolv} /etc/resolv.conf && "
        script += 'exec "$@"'
        prefix = ["unshare", "-m", "--propagation", "private"] if self.isolate else []
        return prefix + ["sh", "-c", script, "sh"] + self.command()

    def start(self, timeout: float = 60.0) -> float:
        """Start the server; returns seconds until it answered 220."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.before_start()
        self._log = open(self.dir / "console.log", "ab")
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            self.launch_command(), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, env=self.env(), start_new_session=True,
        )
        self.group.root_pid = self.proc.pid
        try:
            wait_banner(self.port, timeout)
        except PeerError as error:
            tail = (self.dir / "console.log").read_text(errors="replace")[-1500:]
            self.stop()
            raise PeerError(f"{self.name}: {error}\n{tail}") from None
        return time.perf_counter() - started

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=_STOP_WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        # Children a server leaves behind (Exim's delivery processes), by pid, ours only.
        if self.group.method == "cgroup":
            for _ in range(50):
                pids = self.group.pids()
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGTERM if _ < 25 else signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
        if self._log is not None:
            self._log.close()
            self._log = None

    def wipe_queue(self) -> None:
        """Remove the spool (server stopped), so the next start has an empty queue."""
        for path in self.spool_paths():
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        self.stop()
        self.group.remove()


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _chown(path: Path, user: str, group: str) -> None:
    os.chown(path, pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid)


class RelaydPeer(Peer):
    name = "relayd"

    def config_path(self) -> Path:
        return self.dir / "relay.yaml"

    def prepare(self) -> None:
        from relayd.config.passwords import hash_password

        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "etc").mkdir(exist_ok=True)
        lines = [
            "version: 1",
            "hostname: relayd.bench.example",
            f"spool_dir: {self.dir / 'spool'}",
            f"log_file: {self.dir / 'mainlog'}",
            f"pid_file: {self.dir / 'relayd.pid'}",
            f"control_socket: {self.dir / 'control.sock'}",
            "tls:",
            f"  cert: {self.tls_dir / 'cert.pem'}",
            f"  key: {self.tls_dir / 'key.pem'}",
            "credentials:",
            f"  store: {self.dir / 'etc' / 'credentials.enc'}",
            "listeners:",
            "  - name: submission",
            "    address: 127.0.0.1",
            f"    port: {self.port}",
            "    tls: starttls",
            "transports:",
            "  sink:",
            "    type: smtp",
            "    host: 127.0.0.1",
            f"    port: {self.sink_port}",
            "    tls: none",
            *_shaping_lines(),
            "tenants:",
            "  bench:",
            f'    password_hash: "{hash_password(self.password)}"',
            '    senders: ["*@bench.example"]',
            "    bind_addresses: [127.0.0.1]",
            "    trust_every_local_user: true",
            "    routes:",
            '      - domains: ["*"]',
            "        via: [sink]",
        ]
        _write(self.config_path(), "\n".join(lines) + "\n", 0o600)
        self.tuning = [
            "one STARTTLS listener on 127.0.0.1; tenant 'bench' bound to 127.0.0.1 (no AUTH from there), "
            "AUTH PLAIN over STARTTLS from other loopback addresses",
            "transport 'sink': smtp to 127.0.0.1, tls: none; every other setting at its default "
            "(delivery.max_parallel 20, max_connections 10, 100 messages per connection)",
            "durability default: 250 after syncfs/fsync (group commit); relayd does no DNS or ident lookups",
        ]
        if _shaping_lines():
            self.tuning.append("RELAYBENCH_SHAPING=high: every send limit of 'sink' set, far above the load "
                               "(the cost of checking and counting them)")

    def command(self) -> list[str]:
        return [str(VENV_PY), "-m", "relayd.daemon", "--config", str(self.config_path())]

    def version(self) -> str:
        out = subprocess.run(
            [str(VENV_PY), "-c", "import importlib.metadata as m; print(m.version('relayd'))"],
            capture_output=True, text=True, timeout=30,
        )
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "relayd"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        label = (commit or "no git") + ("+uncommitted changes in relayd/" if dirty else "")
        return f"relayd {out.stdout.strip()} ({label}), Python {_python_version()}"

    def log_mark(self) -> int:
        log = self.dir / "mainlog"
        return log.stat().st_size if log.exists() else 0

    def wait_fully_started(self, mark: int, timeout: float) -> float | None:
        """Waits for "queue index loaded: N message(s) in X.XXs" after `mark`; returns X."""
        log = self.dir / "mainlog"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists():
                with open(log, "rb") as f:
                    f.seek(mark)
                    found = re.search(rb"queue index loaded: \d+ message\(s\) in ([0-9.]+)s", f.read())
                if found:
                    return float(found.group(1))
            time.sleep(0.1)
        return None

    def queue_list_command(self) -> list[str] | None:
        mailq = ROOT / ".venv" / "bin" / "mailq"
        return [str(mailq)] if mailq.exists() else None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["RELAYD_CONFIG"] = str(self.config_path())
        return env

    def spool_paths(self) -> list[Path]:
        return [self.dir / "spool"]


def _python_version() -> str:
    out = subprocess.run([str(VENV_PY), "-V"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip().removeprefix("Python ")


POSTFIX_SBIN = Path("/usr/sbin")
POSTFIX_DAEMONS = Path("/usr/lib/postfix/sbin")

_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixPeer(Peer):
    name = "postfix"

    @property
    def etc(self) -> Path:
        return self.dir / "etc"

    def prepare(self) -> None:
        d = self.dir
        for sub in ("etc", "spool", "data", "etc/sasl"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        _chown(d / "data", "postfix", "postfix")
        main = f"""\
# relaybench: Postfix as a relay for local applications, to one smarthost (the sink).
compatibility_level = 3.6
queue_directory = {d / 'spool'}
data_directory = {d / 'data'}
maillog_file_prefixes = {d}
maillog_file = {d / "maillog"}
myhostname = postfix.bench.example
mydomain = bench.example
myorigin = $mydomain
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
relay_domains =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
relayhost = [127.0.0.1]:{self.sink_port}
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
# anvil's per-client limits (50 connections at once by default) exempt only mynetworks;
# every client here is a local application, so loopback is exempt too.
smtpd_client_event_limit_exceptions = 127.0.0.0/8
# No reverse-DNS of clients, no DNS for the (bracketed, literal) relayhost.
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtp_host_lookup = native
# STARTTLS + SASL for the authenticated scenario (Cyrus sasldb).
smtpd_tls_security_level = may
smtpd_tls_cert_file = {self.tls_dir / 'cert.pem'}
smtpd_tls_key_file = {self.tls_dir / 'key.pem'}
smtpd_tls_auth_only = yes
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {d / 'etc' / 'sasl'}
smtpd_sasl_local_domain = $myhostname
smtpd_sasl_security_options = noanonymous
smtp_tls_security_level = none
biff = no
append_dot_mydomain = no
smtpd_banner = $myhostname ESMTP
"""
        _write(self.etc / "main.cf", main)
        _write(self.etc / "master.cf", _MASTER_CF.format(port=f"127.0.0.1:{self.port}"))
        # Debian's Postfix reads <config_directory>/sasl/smtpd.conf.
        sasldb = d / "etc" / "sasl" / "sasldb2"
        _write(d / "etc" / "sasl" / "smtpd.conf",
               f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {sasldb}\n"
               "mech_list: PLAIN LOGIN\n")
        sasldb.unlink(missing_ok=True)
        subprocess.run(
            [str(POSTFIX_SBIN / "saslpasswd2"), "-p", "-c", "-f", str(sasldb), "-u",
             "postfix.bench.example", "bench"],
            input=self.password.encode(), check=True, timeout=30, capture_output=True,
        )
        _chown(sasldb, "postfix", "postfix")
        sasldb.chmod(0o600)
        self.tuning = [
            "relayhost = [127.0.0.1]:<sink> (brackets: no MX lookup); mynetworks = 127.0.0.1/32; "
            "mydestination empty, local delivery off",
            "smtpd_peername_lookup = no (no reverse DNS of clients); smtp_dns_support_level = disabled",
            "STARTTLS (smtpd_tls_security_level = may) and Cyrus SASL sasldb (PLAIN LOGIN, auth only over TLS)",
            "smtpd_client_event_limit_exceptions = 127.0.0.0/8 (anvil's 50-connection limit would refuse "
            "100 authenticated sessions from one loopback address)",
            "chroot off in master.cf (upstream default); smtpd process limit default (100); "
            "in_flow_delay and every queue/concurrency setting at its default; fsync before 250 (default)",
        ]

    def before_start(self) -> None:
        # Checks the configuration and (re)creates missing queue directories. Postfix reports
        # its errors to the mail log only, so a failure points there.
        out = subprocess.run([str(POSTFIX_SBIN / "postfix"), "-c", str(self.etc), "check"],
                             timeout=60, capture_output=True)
        if out.returncode != 0:
            raise PeerError(f"postfix check failed; see {self.dir / 'maillog'} "
                            f"(or run: script -qc 'postfix -c {self.etc} check' /dev/null)")

    def command(self) -> list[str]:
        return [str(POSTFIX_DAEMONS / "master"), "-c", str(self.etc), "-d"]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["MAIL_CONFIG"] = str(self.etc)
        return env

    def version(self) -> str:
        out = subprocess.run([str(POSTFIX_SBIN / "postconf"), "-d", "-h", "mail_version"],
                             capture_output=True, text=True, timeout=30)
        return f"Postfix {out.stdout.strip()}"

    def queue_list_command(self) -> list[str] | None:
        return [str(POSTFIX_SBIN / "postqueue"), "-c", str(self.etc), "-p"]

    def spool_paths(self) -> list[Path]:
        spool = self.dir / "spool"
        return [spool / q for q in ("incoming", "active", "deferred", "hold", "maildrop", "defer", "bounce", "corrupt", "trace", "flush", "saved")]


class EximPeer(Peer):
    name = "exim"

    @property
    def binary(self) -> Path:
        return self.dir.parent / "exim" / "root" / "usr" / "sbin" / "exim4"

    def config_path(self) -> Path:
        return self.dir / "etc" / "exim.conf"

    def queue_config_path(self) -> Path:
        return self.dir / "etc" / "exim-queue-only.conf"

    def active_config(self) -> Path:
        return self.queue_config_path() if self.queue_only else self.config_path()

    def prepare(self) -> None:
        d = self.dir
        for sub in ("etc", "spool", "log", "tls"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("spool", "log"):
            _chown(d / sub, "Debian-exim", "Debian-exim")
            (d / sub).chmod(0o750)
        for name in ("cert.pem", "key.pem"):
            shutil.copy(self.tls_dir / name, d / "tls" / name)
            _chown(d / "tls" / name, "root", "Debian-exim")
            (d / "tls" / name).chmod(0o640)
        passwd = d / "etc" / "passwd"
        _write(passwd, f"bench: {self.password}\n", 0o640)
        _chown(passwd, "root", "Debian-exim")
        config = _EXIM_CONF.format(
            exim=self.binary, spool=d / "spool", log=d / "log", pid=d / "exim.pid", port=self.port,
            sink=self.sink_port, cert=d / "tls" / "cert.pem", key=d / "tls" / "key.pem", passwd=passwd,
        )
        # The queue test's variant is a second file, not a -D macro: Exim drops root for
        # re-executions that carry -D, and a delivery process must not differ from the daemon.
        for path, text in ((self.config_path(), config),
                           (self.queue_config_path(), config.replace("# QUEUE_ONLY", "queue_only = true\nsmtp_accept_max_per_connection = 0"))):
            _write(path, text, 0o644)
            os.chown(path, 0, 0)
            _trust_exim_config(path)
        self.tuning = [
            "manualroute smarthost to 127.0.0.1:<sink> (self = send, allow_localhost); relay_from_hosts 127.0.0.1",
            "host_lookup unset (no reverse DNS), rfc1413_hosts unset and rfc1413_query_timeout = 0s (no ident)",
            "smtp_accept_max = 300 and smtp_connect_backlog = 256 (defaults 20 and 20 would refuse 100 sessions)",
            "split_spool_directory = true (Exim's advice for large queues); immediate delivery per message (default)",
            "STARTTLS (GnuTLS) and plaintext authenticators PLAIN/LOGIN checked against a file, advertised only over TLS",
            "queue test only: queue_only (upstream down; no delivery attempt per message) and "
            "smtp_accept_max_per_connection = 0 (the injection reuses 20 connections)",
        ]

    def command(self) -> list[str]:
        return [str(self.binary), "-C", str(self.active_config()), "-bdf", "-q30m"]

    def version(self) -> str:
        out = subprocess.run([str(self.binary), "-bV"], capture_output=True, text=True, timeout=30)
        first = out.stdout.splitlines()[0] if out.stdout else "unknown"
        return first.replace("Exim version", "Exim").split(" #")[0] + " (exim4-daemon-light, dpkg -x)"

    def queue_list_command(self) -> list[str] | None:
        return [str(self.binary), "-C", str(self.active_config()), "-bp"]

    def spool_paths(self) -> list[Path]:
        return [self.dir / "spool" / "input", self.dir / "spool" / "msglog", self.dir / "spool" / "db"]


def _trust_exim_config(config: Path) -> None:
    """Debian's Exim honours -C as root only for files listed in /etc/exim4/trusted_configs."""
    listing = Path("/etc/exim4/trusted_configs")
    listing.parent.mkdir(parents=True, exist_ok=True)
    lines = listing.read_text().splitlines() if listing.exists() else []
    if str(config) not in lines:
        lines.append(str(config))
        _write(listing, "\n".join(lines) + "\n", 0o644)


_EXIM_CONF = """\
# relaybench: Exim as a relay for local applications, to one smarthost (the sink).
primary_hostname = exim.bench.example
qualify_domain = bench.example
exim_path = {exim}
spool_directory = {spool}
log_file_path = {log}/%slog
pid_file_path = {pid}
keep_environment =
daemon_smtp_ports = {port}
local_interfaces = 127.0.0.1
never_users = root
hostlist relay_from_hosts = 127.0.0.1
# No reverse-DNS lookup of clients, no ident (RFC 1413) callback.
host_lookup =
rfc1413_hosts =
rfc1413_query_timeout = 0s
# Enough simultaneous sessions for the 100-session runs.
smtp_accept_max = 300
smtp_connect_backlog = 256
split_spool_directory = true
tls_advertise_hosts = *
tls_certificate = {cert}
tls_privatekey = {key}
auth_advertise_hosts = ${{if eq{{$tls_in_cipher}}{{}}{{}}{{*}}}}
acl_smtp_rcpt = acl_check_rcpt
# QUEUE_ONLY

begin acl
acl_check_rcpt:
  accept hosts = +relay_from_hosts
  accept authenticated = *
  deny message = relay not permitted

begin routers
smarthost:
  driver = manualroute
  domains = *
  transport = remote_smtp
  route_list = * 127.0.0.1 byname
  self = send
  no_more

begin transports
remote_smtp:
  driver = smtp
  port = {sink}
  allow_localhost
  hosts_avoid_tls = *

begin retry
*   *   F,2h,15m; G,16h,1h,1.5; F,4d,6h

begin authenticators
plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${{if eq{{$auth3}}{{${{lookup{{$auth2}}lsearch{{{passwd}}}{{$value}}fail}}}}}}
  server_set_id = $auth2
login:
  driver = plaintext
  public_name = LOGIN
  server_prompts = Username:: : Password::
  server_condition = ${{if eq{{$auth2}}{{${{lookup{{$auth1}}lsearch{{{passwd}}}{{$value}}fail}}}}}}
  server_set_id = $auth1
"""


# Every shaping key of the sink transport, set far above what the bench can
# send: `RELAYBENCH_SHAPING=high bench/run ...` measures what checking and
# counting the limits costs against the same run without it.
_HIGH_SHAPING = (
    "    max_per_second: 10000",
    "    max_per_minute: 1000000",
    "    max_per_hour: 10000000",
    "    max_per_day: 100000000",
    "    max_recipients_per_day: 1000000000",
)


def _shaping_lines() -> tuple[str, ...]:
    return _HIGH_SHAPING if os.environ.get("RELAYBENCH_SHAPING") == "high" else ()
