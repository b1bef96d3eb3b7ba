"""One loopback answer for every stage: config checks, session limits, plaintext AUTH, relayctl."""

import pytest

from relayd.netaddr import is_loopback


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1", "localhost", "LOCALHOST", "::ffff:127.0.0.1"])
def test_addresses_only_this_machine_can_reach_are_loopback(address: str) -> None:
    assert is_loopback(address)


@pytest.mark.parametrize("address", ["10.0.0.1", "192.0.2.7", "::ffff:192.0.2.7", "fe80::1%eth0", "2001:db8::1",
                                     "", "localhost.example", "127.0.0.1.example", "not an address"])
def test_other_addresses_and_names_are_not(address: str) -> None:
    assert not is_loopback(address)
