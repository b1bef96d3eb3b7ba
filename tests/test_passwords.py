"""Tenant password hashes: format, verification, refusal of unusable hashes, dummy hash."""

from __future__ import annotations

import base64

import pytest

from relayd.config.passwords import (
    DUMMY_HASH,
    PASSWORD_ALPHABET,
    describe_hash_problem,
    generate_password,
    hash_password,
    verify_password,
)


def test_hash_has_the_six_field_scrypt_shape_the_config_loader_expects() -> None:
    encoded = hash_password("correct horse battery staple")
    fields = encoded.split("$")
    assert len(fields) == 6
    assert fields[:4] == ["scrypt", "14", "8", "1"]
    assert len(base64.b64decode(fields[4], validate=True)) == 16
    assert len(base64.b64decode(fields[5], validate=True)) == 32
    assert "\n" not in encoded


def test_right_password_verifies_and_wrong_one_does_not() -> None:
    encoded = hash_password("s3cret-tenant-pass")
    assert verify_password("s3cret-tenant-pass", encoded)
    assert not verify_password("s3cret-tenant-pasS", encoded)
    assert not verify_password("", encoded)


def test_same_password_hashes_differently_each_time_because_of_the_salt() -> None:
    assert hash_password("same") != hash_password("same")


def test_non_ascii_password_round_trips() -> None:
    encoded = hash_password("pässwörd-€-日本")
    assert verify_password("pässwörd-€-日本", encoded)
    assert not verify_password("passwort-€-日本", encoded)


def test_empty_password_is_refused_when_hashing() -> None:
    with pytest.raises(ValueError, match="empty"):
        hash_password("")


def test_password_that_is_not_utf8_is_refused_without_quoting_it() -> None:
    with pytest.raises(ValueError) as info:
        hash_password("ab\udcffcd")
    assert "\udcff" not in str(info.value)
    assert not verify_password("ab\udcffcd", DUMMY_HASH)


_GOOD = hash_password("x")
_SALT, _DIGEST = _GOOD.split("$")[4:]


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "scrypt",
        "$$$$$",
        f"bcrypt$14$8$1${_SALT}${_DIGEST}",
        f"scrypt$14$8$1${_SALT}",
        f"scrypt$14$8$1${_SALT}${_DIGEST}$extra",
        f"scrypt$fourteen$8$1${_SALT}${_DIGEST}",
        f"scrypt$-14$8$1${_SALT}${_DIGEST}",
        f"scrypt$１４$8$1${_SALT}${_DIGEST}",  # full-width digits
        f"scrypt$14$8$1$not*base64${_DIGEST}",
        f"scrypt$14$8$1${_SALT}$",
        f"scrypt$14$8$1$$${_DIGEST}",
        f"scrypt$4$8$1${_SALT}${_DIGEST}",  # too cheap to resist guessing
        f"scrypt$30$8$1${_SALT}${_DIGEST}",  # would take GiBs per login
        f"scrypt$20$32$1${_SALT}${_DIGEST}",  # memory bound
        f"scrypt$14$8$99${_SALT}${_DIGEST}",
        f"scrypt$14$8$1$c2FsdA==${_DIGEST}",  # 4-byte salt
        f"scrypt$14$8$1${_SALT}$c2hvcnQ=",  # 5-byte hash
    ],
)
def test_malformed_or_unsafe_hash_verifies_as_false_and_is_described(encoded: str) -> None:
    assert verify_password("x", encoded) is False
    problem = describe_hash_problem(encoded)
    assert problem is not None and problem.startswith("not a usable password hash")


def test_a_good_hash_has_no_problem() -> None:
    assert describe_hash_problem(_GOOD) is None


def test_hash_with_other_valid_parameters_still_verifies() -> None:
    # Hashes written with other (bounded) costs stay usable after a default change.
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    salt = b"0123456789abcdef"
    digest = Scrypt(salt=salt, length=32, n=2**12, r=4, p=2).derive(b"older")
    encoded = "scrypt$12$4$2${}${}".format(
        base64.b64encode(salt).decode(), base64.b64encode(digest).decode()
    )
    assert verify_password("older", encoded)
    assert not verify_password("newer", encoded)


def test_dummy_hash_is_usable_costs_the_same_and_matches_nothing_tried() -> None:
    assert describe_hash_problem(DUMMY_HASH) is None
    assert DUMMY_HASH.split("$")[:4] == hash_password("y").split("$")[:4]
    for guess in ["", "password", "dummy", DUMMY_HASH, "x" * 64]:
        assert not verify_password(guess, DUMMY_HASH)


def test_generated_passwords_use_the_url_safe_alphabet_and_do_not_repeat() -> None:
    passwords = {generate_password() for _ in range(50)}
    assert len(passwords) == 50
    for password in passwords:
        assert len(password) == 24
        assert set(password) <= set(PASSWORD_ALPHABET)
    assert len(generate_password(40)) == 40


@pytest.mark.parametrize("length", [0, 8, 11, 257])
def test_generate_password_refuses_lengths_outside_bounds(length: int) -> None:
    with pytest.raises(ValueError):
        generate_password(length)
