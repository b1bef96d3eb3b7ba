"""The managed tenants file: tenants that `relayctl tenant` creates and changes.

Takes: the file's path (`tenants_file:` in relay.yaml, default tenants.yaml
beside the credential store), relay.yaml's transport names and its own
tenants, and `TenantConfig` values to store.
Emits: the file, in the schema of relay.yaml's `tenants:` section under a
`version: 1` header, so relayd's loader reads both the same way and the admin's
commented relay.yaml is never rewritten.
Untrusted input: the file's current content (it may have been edited by hand);
it is read with relayd.config.loader, never trusted as it stands.
How it fails: `TenantsFileLocked` when another relayctl holds the lock past
the timeout; relayd.config.loader.ConfigError when the current file does not
check, `TenantRejected` when what would be written does not (nothing is
written then); OSError for I/O.

Every change is lock, read, change, check, write: the lock (a sibling
`.lock` file held with flock) serialises relayctl runs, so two `tenant add`s
at once both survive; the write is atomic and durable (temporary file, fsync,
rename, directory fsync; relayd.safeio.write_private_file) with mode 0600.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, TypeVar

import yaml

from relayd.config.model import TenantConfig
from relayd.config.loader import MAX_CONFIG_BYTES, ConfigError, ConfigProblem, parse_managed_tenants
from relayd.safeio import write_private_file

T = TypeVar("T")

LOCK_TIMEOUT = 10.0  # seconds; a relayctl run holds the lock for well under one
_LOCK_POLL = 0.05

HEADER = """\
# Tenants managed by `relayctl tenant` (add, passwd, enable, disable, remove).
# relayd reads this file together with relay.yaml; the schema is that of
# relay.yaml's `tenants:` section. relayctl rewrites it whole: edit it with
# relayctl, and keep hand-written tenants in relay.yaml.
"""


class TenantsFileLocked(Exception):
    """Another relayctl kept the tenants file locked for longer than the timeout."""


class TenantRejected(ValueError):
    """What would be written does not check; the message says why (no file positions,
    since the file was never written)."""


def tenant_fields(tenant: TenantConfig) -> dict[str, object]:
    """The YAML mapping for one tenant, keys in relay.yaml's usual order; pure."""
    fields: dict[str, object] = {}
    if tenant.password_hash is not None:
        fields["password_hash"] = tenant.password_hash
    fields["senders"] = list(tenant.senders)
    if tenant.bind_addresses:
        fields["bind_addresses"] = list(tenant.bind_addresses)
    if tenant.trust_every_local_user:
        fields["trust_every_local_user"] = True
    if tenant.local_uids:
        fields["local_users"] = list(tenant.local_uids)
    if tenant.max_recipients is not None:
        fields["max_recipients"] = tenant.max_recipients
    if tenant.max_message_size is not None:
        fields["max_message_size"] = tenant.max_message_size
    fields["enabled"] = tenant.enabled
    fields["routes"] = [
        {"name": r.name, "domains": list(r.domains), "via": list(r.transports)}
        for r in tenant.routes
    ]
    return fields


def render_tenants_file(tenants: Iterable[TenantConfig]) -> str:
    """The whole file for these tenants, sorted by name; pure."""
    body = {"version": 1, "tenants": {t.name: tenant_fields(t) for t in sorted(tenants, key=lambda t: t.name)}}
    dumped = yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=1000,
                            allow_unicode=True)
    return HEADER + str(dumped)


class ManagedTenants:
    """The managed tenants file of one relay.yaml."""

    def __init__(
        self,
        path: Path,
        *,
        shown: str,
        transport_names: frozenset[str],
        defined: Mapping[str, TenantConfig],
        lock_timeout: float = LOCK_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.shown = shown  # the name used in messages
        self._transport_names = transport_names
        self._defined = defined  # relay.yaml's own tenants, which this file may not repeat
        self._lock_timeout = lock_timeout
        self._clock = clock

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lock file; the lock file itself is never removed (that would race)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            self._acquire(fd)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _acquire(self, fd: int) -> None:
        deadline = self._clock() + self._lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if self._clock() >= deadline:
                    raise TenantsFileLocked(
                        f"{self.shown}: another relayctl has held its lock for "
                        f"{self._lock_timeout:g}s; try again"
                    ) from None
                time.sleep(_LOCK_POLL)

    def read(self) -> dict[str, TenantConfig]:
        """The file's tenants (none when it does not exist yet); ConfigError if it does not check."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            return {}
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError([ConfigProblem(self.shown, 0, 0, "the file is too large")])
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError([ConfigProblem(self.shown, 0, 0, "the file is not valid UTF-8")]) from None
        return dict(self._parse(text))

    def _parse(self, text: str) -> Mapping[str, TenantConfig]:
        return parse_managed_tenants(text, file=self.shown, base=self.path.parent,
                                     transport_names=self._transport_names, defined=self._defined)

    def write(self, tenants: Mapping[str, TenantConfig]) -> None:
        """Check, then atomically replace the file (mode 0600), keeping its owner."""
        text = render_tenants_file(tenants.values())
        try:
            self._parse(text)  # what relayd will read must load
        except ConfigError as exc:
            reasons = dict.fromkeys(p.message for p in exc.problems)
            raise TenantRejected("; ".join(reasons)) from None
        owner = _owner_for(self.path)
        write_private_file(self.path, text.encode("utf-8"))
        if owner is not None:
            os.chown(self.path, *owner)

    def update(self, change: Callable[[dict[str, TenantConfig]], T]) -> T:
        """Lock, read, let `change` edit the tenants in place, write; returns what `change` does.

        If `change` raises, nothing is written.
        """
        with self.locked():
            tenants = self.read()
            result = change(tenants)
            self.write(tenants)
            return result


def _owner_for(path: Path) -> tuple[int, int] | None:
    """When root rewrites the file, it keeps the owner relayd reads it as.

    That is the existing file's owner, or for a new file the owner of its
    directory (relayd's state directory); None when not running as root.
    """
    if os.geteuid() != 0:
        return None
    try:
        st = path.stat()
    except FileNotFoundError:
        st = path.parent.stat()
    return st.st_uid, st.st_gid
