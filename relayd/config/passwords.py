"""Tenant SMTP AUTH passwords, kept only as salted scrypt hashes.

Takes: a password typed by an operator (`relayctl tenant hash-password`) or
sent by a client in SMTP AUTH, and a hash string from `relay.yaml`.
Emits: `scrypt$<log2n>$<r>$<p>$<salt b64>$<hash b64>` strings and yes/no answers.
Untrusted input: the password (from any client on the listener) and the hash
text (from the config file, which may have been edited by hand).
Fails: `hash_password` raises ValueError for an empty or non-UTF-8 password;
`verify_password` never raises, it answers False for anything it cannot use.

Why scrypt with bounded parameters: it costs memory as well as time, so a
stolen config is slow to attack; the bounds stop a hand-edited hash with a huge
cost factor from turning every login into a denial of service.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import string
from dataclasses import dataclass

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

SCHEME = "scrypt"
LOG2_N = 14  # n = 16384: about 40 ms and 16 MiB per verification
BLOCK_SIZE = 8  # scrypt r
PARALLELISM = 1  # scrypt p
SALT_BYTES = 16
KEY_BYTES = 32

# Hashes outside these bounds are refused: below, too cheap to resist guessing;
# above, one login could take seconds and hundreds of MiB.
MIN_LOG2_N = 10
MAX_LOG2_N = 20
MAX_BLOCK_SIZE = 32
MAX_PARALLELISM = 4
MAX_SCRYPT_MEMORY = 128 * 1024 * 1024  # bytes: 128 * n * r
MIN_SALT_BYTES = 8
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 64

# Generated passwords: the URL-safe base64 alphabet (6 bits a character), so a
# password survives .env files, URLs and YAML without quoting.
PASSWORD_ALPHABET = string.ascii_letters + string.digits + "-_"
MIN_GENERATED_LENGTH = 12  # 72 bits
MAX_GENERATED_LENGTH = 256


@dataclass(frozen=True, slots=True)
class _ScryptHash:
    log2_n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _encode_password(password: str) -> bytes:
    try:
        return password.encode("utf-8")
    except UnicodeEncodeError:
        # The exception text would quote the offending character: say less.
        raise ValueError("the password is not valid UTF-8 text") from None


def _derive(password: bytes, h: _ScryptHash) -> bytes:
    kdf = Scrypt(salt=h.salt, length=len(h.digest), n=2**h.log2_n, r=h.r, p=h.p)
    return kdf.derive(password)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _format(h: _ScryptHash) -> str:
    return f"{SCHEME}${h.log2_n}${h.r}${h.p}${_b64(h.salt)}${_b64(h.digest)}"


def _parse_int(text: str, low: int, high: int, what: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"{what} is not a number")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{what} {value} is outside {low}..{high}")
    return value


def _parse_b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError(f"the {what} is not base64") from None


def _parse(encoded: str) -> _ScryptHash:
    """Split and check a hash string; ValueError says what is wrong with it."""
    fields = encoded.split("$")
    if len(fields) != 6 or fields[0] != SCHEME:
        raise ValueError(f"expected {SCHEME}$LOG2N$R$P$SALT$HASH (6 fields separated by $)")
    log2_n = _parse_int(fields[1], MIN_LOG2_N, MAX_LOG2_N, "log2(n)")
    r = _parse_int(fields[2], 1, MAX_BLOCK_SIZE, "r")
    p = _parse_int(fields[3], 1, MAX_PARALLELISM, "p")
    if 128 * (2**log2_n) * r > MAX_SCRYPT_MEMORY:
        raise ValueError("the cost parameters need more than 128 MiB of memory")
    salt = _parse_b64(fields[4], "salt")
    digest = _parse_b64(fields[5], "hash")
    if len(salt) < MIN_SALT_BYTES:
        raise ValueError(f"the salt is shorter than {MIN_SALT_BYTES} bytes")
    if not MIN_KEY_BYTES <= len(digest) <= MAX_KEY_BYTES:
        raise ValueError(f"the hash is not {MIN_KEY_BYTES}..{MAX_KEY_BYTES} bytes long")
    return _ScryptHash(log2_n, r, p, salt, digest)


def hash_password(password: str) -> str:
    """Hash `password` with a fresh random salt, for `password_hash:` in relay.yaml."""
    secret = _encode_password(password)
    if not secret:
        raise ValueError("refusing to hash an empty password")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = Scrypt(salt=salt, length=KEY_BYTES, n=2**LOG2_N, r=BLOCK_SIZE, p=PARALLELISM)
    return _format(_ScryptHash(LOG2_N, BLOCK_SIZE, PARALLELISM, salt, digest.derive(secret)))


def describe_hash_problem(encoded: str) -> str | None:
    """Say in one sentence why `encoded` cannot be used, or None if it can.

    For the config loader: a hash that `verify_password` would always refuse
    should be reported when the config is read, not discovered at login.
    """
    try:
        _parse(encoded)
    except ValueError as exc:
        return f"not a usable password hash: {exc}"
    return None


def verify_password(password: str, encoded: str) -> bool:
    """True if `password` matches `encoded`; False for a mismatch or an unusable hash.

    The comparison is constant-time. The cost is the hash's own scrypt cost,
    so callers check unknown logins against DUMMY_HASH to take the same time.
    """
    try:
        h = _parse(encoded)
        candidate = _derive(_encode_password(password), h)
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(candidate, h.digest)


def generate_password(length: int = 24) -> str:
    """A random password over the URL-safe alphabet (24 characters = 144 bits)."""
    if not MIN_GENERATED_LENGTH <= length <= MAX_GENERATED_LENGTH:
        raise ValueError(
            f"password length must be {MIN_GENERATED_LENGTH}..{MAX_GENERATED_LENGTH}"
        )
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(length))


# The hash of a value nobody knows, computed once: verifying an unknown login
# against it costs the same as a real check, so timing does not tell an
# attacker which logins exist.
DUMMY_HASH: str = hash_password(secrets.token_urlsafe(32))
