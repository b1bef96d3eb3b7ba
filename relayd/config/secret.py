"""`Secret`: a string that never shows itself, for passwords, tokens and keys.

Takes: the secret text, from the decrypted credential store or a token endpoint.
Emits: the value only through `reveal()`; repr, str, format and pickle are redacted.
Untrusted input: none.
Fails: TypeError for anything but a str, and on pickling.
"""

from __future__ import annotations

import hmac
from typing import NoReturn


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
