"""Upstream provider credentials (Gmail app passwords, SendGrid API keys...), encrypted at rest.

Takes: a master key (systemd credential, environment variable or key file) and
the credential store file named in `relay.yaml`.
Emits: `UpstreamCredential` values whose password is a `Secret` that never
prints; an encrypted store file (mode 0600) written atomically and durably.
Untrusted input: the store and key files, which may be truncated, tampered
with, swapped or too widely readable; and the environment.
Fails: `MasterKeyError` when no usable key is found or a key file is too open;
`CredentialStoreError` when the store cannot be read or decrypted. Both carry
one sentence starting with the path, and never contain key or password material.

Store format (version 1), a JSON object:
    {"format": "relayd-credentials", "version": 1, "key_id": "1a2b3c4d",
     "nonce": "<base64>", "ciphertext": "<base64>"}
The plaintext is JSON `{name: {"user": ..., "password": ...}}`, sealed with
AES-256-GCM under the key whose id is `key_id` (first 8 hex digits of its
SHA-256); the header fields are the associated data, so changing any of them
makes decryption fail instead of misreading the file.

Key file format: one URL-safe base64 key (32 bytes) a line. The first key
encrypts; the others only decrypt. That is what makes `rotate_key` crash-safe:
the new key is added in front before the store is re-encrypted, and the old
ones are dropped only after the re-encrypted store is on disk.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, NoReturn, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relayd.config.model import CredentialsConfig
from relayd.safeio import write_private_file

MASTER_KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # 96 bits, the size GCM is designed for
STORE_FORMAT = "relayd-credentials"
STORE_VERSION = 1
SYSTEMD_CREDENTIAL_NAME = "relayd-master-key"
MASTER_KEY_ENV = "RELAYD_MASTER_KEY"
# A store of a few hundred credentials is a few tens of KiB; refusing anything
# far larger keeps a wrong path (a log file, a disk image) from being slurped.
MAX_STORE_BYTES = 16 * 1024 * 1024
MAX_KEY_FILE_BYTES = 64 * 1024
MAX_NAME_LENGTH = 64
MAX_FIELD_LENGTH = 4096
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class CredentialError(Exception):
    """Base of the errors below; the message is one sentence safe to show."""


class MasterKeyError(CredentialError):
    """No usable master key, or a key file that is too widely readable."""


class MasterKeyMissing(MasterKeyError):
    """No master key at any of the places looked at."""


class CredentialStoreError(CredentialError):
    """The store cannot be read, decrypted, or does not hold what it should."""


class StoreKeyMismatch(CredentialStoreError):
    """The store is sealed under a key the caller does not have (e.g. after rotate-key)."""

    def __init__(self, message: str, *, store_key_id: str) -> None:
        super().__init__(message)
        self.store_key_id = store_key_id


class Secret:
    """A string that does not show itself: repr, str, format and pickle are redacted.

    Call `reveal()` at the last moment (when sending AUTH), never earlier.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __format__(self, format_spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        """Unhashable: a hash of the value is a (weak) oracle on it."""
        raise TypeError("unhashable type: 'Secret'")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Secret:
        return self


@dataclass(frozen=True)
class UpstreamCredential:
    """The login relayd presents to one upstream transport."""

    name: str
    user: str
    password: Secret
    # The kind of credential (relayd.delivery.upstreamauth.UpstreamLogin): which AUTH
    # mechanisms can use it. The store holds password credentials only, so far.
    kind: Literal["password"] = field(default="password", init=False)


class KeySource(enum.Enum):
    SYSTEMD_CREDENTIAL = "systemd credential"
    ENVIRONMENT = "environment variable"
    KEY_FILE = "key file"


@dataclass(frozen=True, eq=False)
class MasterKeys:
    """The keys found, and where: rotation needs to know whether it may rewrite them."""

    keys: tuple[bytes, ...] = field(repr=False)
    source: KeySource
    path: Path | None  # the file read, or None for the environment variable

    @property
    def primary(self) -> bytes:
        return self.keys[0]

    def describe(self) -> str:
        return f"${MASTER_KEY_ENV}" if self.path is None else str(self.path)


# ---------------------------------------------------------------- master keys


def key_id(key: bytes) -> str:
    """The public name of a key: first 8 hex digits of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:8]


def generate_master_key() -> bytes:
    return secrets.token_bytes(MASTER_KEY_BYTES)


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != MASTER_KEY_BYTES:
        raise MasterKeyError(f"a master key must be {MASTER_KEY_BYTES} bytes")


def encode_keys(keys: Sequence[bytes]) -> str:
    """The key file text for `keys`, primary first."""
    for key in keys:
        _check_key(key)
    return "".join(base64.urlsafe_b64encode(k).decode("ascii") + "\n" for k in keys)


def _decode_key_line(line: str) -> bytes | None:
    text = line.strip()
    text += "=" * (-len(text) % 4)
    try:
        key = base64.b64decode(text.encode("ascii"), altchars=b"-_", validate=True)
    except (UnicodeEncodeError, binascii.Error):
        return None
    return key if len(key) == MASTER_KEY_BYTES else None


def parse_keys(text: str, where: str) -> tuple[bytes, ...]:
    """Parse key file text; blank lines and `#` comments are ignored."""
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key = _decode_key_line(line)
        if key is None:
            # Never echo the line: it may be a key with one character wrong.
            raise MasterKeyError(
                f"{where}: line {number} is not a master key "
                f"(expected {MASTER_KEY_BYTES} bytes in URL-safe base64)"
            )
        keys.append(key)
    if not keys:
        raise MasterKeyError(f"{where}: holds no master key")
    return tuple(keys)


def _read_limited(fd: int, limit: int) -> bytes:
    chunks = []
    total = 0
    while total <= limit:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _read_key_text(path: Path, *, check_mode: bool) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MasterKeyError(f"{path}: cannot read the master key: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # of the file opened, not of whatever the name points to now
        if not stat.S_ISREG(st.st_mode):
            raise MasterKeyError(f"{path}: the master key must be a regular file")
        if check_mode and st.st_mode & 0o077:
            raise MasterKeyError(
                f"{path}: the master key file is accessible to group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); fix with: chmod 600 {path}"
            )
        data = _read_limited(fd, MAX_KEY_FILE_BYTES)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise MasterKeyError(f"{path}: too large to be a master key file")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise MasterKeyError(f"{path}: not a master key file (not ASCII text)") from None


def read_key_file(path: Path) -> tuple[bytes, ...]:
    """Keys from a key file the operator manages; refused if group/other may access it."""
    return parse_keys(_read_key_text(path, check_mode=True), str(path))


def locate_master_keys(config: CredentialsConfig, environ: Mapping[str, str]) -> MasterKeys:
    """Find the master keys: systemd credential, then $RELAYD_MASTER_KEY, then the key file.

    The systemd credential is not mode-checked: systemd keeps it in a directory
    private to the service and grants the service user read access with an ACL,
    which shows in the group bits of the mode.
    """
    looked: list[str] = []
    cred_dir = environ.get("CREDENTIALS_DIRECTORY", "")
    if cred_dir:
        path = Path(cred_dir) / SYSTEMD_CREDENTIAL_NAME
        if path.exists():
            text = _read_key_text(path, check_mode=False)
            return MasterKeys(parse_keys(text, str(path)), KeySource.SYSTEMD_CREDENTIAL, path)
        looked.append(f"{path} (no such file)")
    else:
        looked.append(f"$CREDENTIALS_DIRECTORY/{SYSTEMD_CREDENTIAL_NAME} (not set)")
    env_text = environ.get(MASTER_KEY_ENV, "")
    if env_text.strip():
        return MasterKeys(parse_keys(env_text, f"${MASTER_KEY_ENV}"), KeySource.ENVIRONMENT, None)
    looked.append(f"${MASTER_KEY_ENV} (not set)")
    key_file = config.master_key_file
    if key_file is not None and key_file.exists():
        return MasterKeys(read_key_file(key_file), KeySource.KEY_FILE, key_file)
    if key_file is None:
        looked.append("credentials.master_key_file (not configured)")
    else:
        looked.append(f"{key_file} (no such file)")
    raise MasterKeyMissing("no master key found; looked at " + ", ".join(looked))


def load_master_keys(config: CredentialsConfig, environ: Mapping[str, str]) -> list[bytes]:
    """The master keys, primary first (see `locate_master_keys` for the search order)."""
    return list(locate_master_keys(config, environ).keys)


# ------------------------------------------------------------ durable writes


def write_key_file(path: Path, keys: Sequence[bytes], *, replace: bool = True) -> None:
    """Write `keys` (primary first) to a 0600 key file, atomically."""
    if not keys:
        raise MasterKeyError("refusing to write a key file without keys")
    write_private_file(path, encode_keys(keys).encode("ascii"), replace=replace)


# --------------------------------------------------------------- the store


def _associated_data(header: Mapping[str, object]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")


def check_name(name: str) -> None:
    """Credential names are what `credential:` in relay.yaml refers to: short and plain."""
    if not name or len(name) > MAX_NAME_LENGTH or not set(name) <= _NAME_CHARS:
        raise ValueError(
            f"a credential name must be 1-{MAX_NAME_LENGTH} characters "
            "of letters, digits, '.', '_' and '-'"
        )


def _check_field(value: str, what: str) -> None:
    if not value:
        raise ValueError(f"the {what} must not be empty")
    if len(value) > MAX_FIELD_LENGTH:
        raise ValueError(f"the {what} is longer than {MAX_FIELD_LENGTH} characters")
    if any(c in value for c in "\x00\r\n"):
        # NUL separates fields in AUTH PLAIN; CR/LF have no place in a login.
        raise ValueError(f"the {what} must not contain NUL, CR or LF")


def _fail(path: Path, sentence: str) -> NoReturn:
    raise CredentialStoreError(f"{path}: {sentence}")


def _read_store_bytes(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STORE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        _fail(path, f"cannot read: {exc.strerror}")
    if len(data) > MAX_STORE_BYTES:
        _fail(path, "too large to be a credential store")
    return data


def _parse_envelope(path: Path, data: bytes) -> tuple[dict[str, object], bytes, bytes]:
    """Split the file into (header, nonce, ciphertext), checking every field."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        _fail(path, "not a relayd credential store (not JSON)")
    if not isinstance(doc, dict) or doc.get("format") != STORE_FORMAT:
        _fail(path, "not a relayd credential store")
    if doc.get("version") != STORE_VERSION:
        _fail(path, f"store version is not supported (this relayd reads version {STORE_VERSION})")
    expected = {"format", "version", "key_id", "nonce", "ciphertext"}
    if set(doc) != expected:
        _fail(path, "damaged credential store (unexpected or missing fields)")
    kid = doc["key_id"]
    if not isinstance(kid, str) or len(kid) != 8 or not all(c in "0123456789abcdef" for c in kid):
        _fail(path, "damaged credential store (bad key_id)")
    try:
        nonce = base64.b64decode(doc["nonce"], validate=True)
        ciphertext = base64.b64decode(doc["ciphertext"], validate=True)
    except (TypeError, ValueError):  # not a str, non-ASCII, or not base64
        _fail(path, "damaged credential store (nonce or ciphertext is not base64)")
    if len(nonce) != NONCE_BYTES:
        _fail(path, "damaged credential store (bad nonce)")
    header = {k: doc[k] for k in ("format", "version", "key_id", "nonce")}
    return header, nonce, ciphertext


def _parse_plaintext(path: Path, plaintext: bytes) -> dict[str, tuple[str, str]]:
    try:
        doc: object = json.loads(plaintext)
    except (UnicodeDecodeError, json.JSONDecodeError):
        _fail(path, "damaged credential store (decrypted content is not JSON)")
    if not isinstance(doc, dict):
        _fail(path, "damaged credential store (decrypted content is not an object)")
    entries: dict[str, tuple[str, str]] = {}
    for name, entry in doc.items():
        user = entry.get("user") if isinstance(entry, dict) else None
        password = entry.get("password") if isinstance(entry, dict) else None
        if not isinstance(user, str) or not isinstance(password, str):
            _fail(path, "damaged credential store (an entry lacks user or password)")
        entries[str(name)] = (user, password)
    return entries


class CredentialStore:
    """The named upstream logins, decrypted in memory, saved encrypted.

    Not safe against two writers at once: the last `save()` wins. relayctl is
    the only writer; the daemon only reads.
    """

    def __init__(
        self, path: Path, keys: Sequence[bytes], entries: dict[str, tuple[str, str]]
    ) -> None:
        if not keys:
            raise MasterKeyError("a credential store needs at least one master key")
        for key in keys:
            _check_key(key)
        self._path = path
        self._keys = tuple(keys)
        self._entries = entries

    @classmethod
    def open(cls, path: Path, keys: Sequence[bytes]) -> CredentialStore:
        """Read and decrypt `path`; a missing file is an empty store."""
        if not keys:
            raise MasterKeyError("a credential store needs at least one master key")
        data = _read_store_bytes(path)
        if data is None:
            return cls(path, keys, {})
        header, nonce, ciphertext = _parse_envelope(path, data)
        by_id = {key_id(k): k for k in keys}
        key = by_id.get(str(header["key_id"]))
        if key is None:
            raise StoreKeyMismatch(
                f"{path}: cannot decrypt: the master key does not match this store "
                f"(key id {header['key_id']})",
                store_key_id=str(header["key_id"]),
            )
        try:
            plaintext = AESGCM(key).decrypt(nonce, ciphertext, _associated_data(header))
        except InvalidTag:
            _fail(path, "cannot decrypt: the file was altered or damaged (authentication failed)")
        return cls(path, keys, _parse_plaintext(path, plaintext))

    @property
    def path(self) -> Path:
        return self._path

    def __repr__(self) -> str:
        return f"CredentialStore({str(self._path)!r}, {len(self._entries)} credentials)"

    def get(self, name: str) -> UpstreamCredential | None:
        entry = self._entries.get(name)
        if entry is None:
            return None
        return UpstreamCredential(name=name, user=entry[0], password=Secret(entry[1]))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def users(self) -> dict[str, str]:
        """name -> user, for listings that must not touch passwords."""
        return {name: self._entries[name][0] for name in self.names()}

    def set(self, name: str, user: str, password: str) -> None:
        """Add or replace a credential in memory; `save()` writes it."""
        check_name(name)
        _check_field(user, "user name")
        _check_field(password, "password")
        self._entries[name] = (user, password)

    def remove(self, name: str) -> bool:
        return self._entries.pop(name, None) is not None

    def save(self) -> None:
        """Encrypt with the primary key and replace the file atomically (mode 0600)."""
        write_private_file(self._path, self._seal(), keep_owner=True)

    def _seal(self) -> bytes:
        primary = self._keys[0]
        nonce = secrets.token_bytes(NONCE_BYTES)
        header: dict[str, object] = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "key_id": key_id(primary),
            "nonce": base64.b64encode(nonce).decode("ascii"),
        }
        plain = {n: {"user": u, "password": p} for n, (u, p) in sorted(self._entries.items())}
        plaintext = json.dumps(plain, separators=(",", ":")).encode("utf-8")
        ciphertext = AESGCM(primary).encrypt(nonce, plaintext, _associated_data(header))
        doc = dict(header, ciphertext=base64.b64encode(ciphertext).decode("ascii"))
        return (json.dumps(doc, indent=2) + "\n").encode("ascii")


# ---------------------------------------------------------------- rotation


def begin_key_rotation(key_file: Path, current_keys: Sequence[bytes]) -> bytes:
    """Step 1: write [new, *current] to `key_file`; the store still opens with it."""
    new_key = generate_master_key()
    write_key_file(key_file, [new_key, *current_keys])
    return new_key


def reencrypt_store(store_path: Path, keys: Sequence[bytes]) -> None:
    """Step 2: rewrite the store under `keys[0]` (a missing store stays missing)."""
    store = CredentialStore.open(store_path, keys)
    if store_path.exists():
        store.save()


def finish_key_rotation(key_file: Path, new_key: bytes) -> None:
    """Step 3: drop the old keys from `key_file`."""
    write_key_file(key_file, [new_key])


def rotate_key(
    store_path: Path, key_file: Path, *, current_keys: Sequence[bytes] | None = None
) -> str:
    """Replace the master key and re-encrypt the store; returns the new key id.

    `current_keys` defaults to the keys in `key_file`; pass them (from the
    environment or a systemd credential) to write the new key to a fresh
    `key_file` instead. The store is opened first, so a wrong key changes
    nothing. A crash after any step leaves a key file that opens the store.
    """
    old = tuple(current_keys) if current_keys is not None else read_key_file(key_file)
    CredentialStore.open(store_path, old)
    new_key = begin_key_rotation(key_file, old)
    reencrypt_store(store_path, [new_key, *old])
    finish_key_rotation(key_file, new_key)
    return key_id(new_key)
