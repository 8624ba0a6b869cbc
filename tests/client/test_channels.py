"""Targets naming one server or several replicas."""

from __future__ import annotations

import json

from jobwire.client.channels import CHANNEL_OPTIONS, resolve_target


def test_one_address_or_a_grpc_target_is_kept_as_it_is() -> None:
    for target in ("localhost:50051", "dns:///jobs.internal:50051", "ipv4:10.0.0.1:1,10.0.0.2:1", "unix:/s"):
        assert resolve_target(target) == target


def test_several_addresses_become_one_target_for_round_robin() -> None:
    assert (
        resolve_target("127.0.0.1:1, 127.0.0.1:2,localhost:3") == "ipv4:127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"
    )
    assert resolve_target("[::1]:7,[::1]:8") == "ipv6:[::1]:7,[::1]:8"


def test_calls_are_spread_with_round_robin() -> None:
    config = json.loads(dict(CHANNEL_OPTIONS)["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
