"""The operator benchmark's checks of the directory: whole entries, and the mode it runs."""

from __future__ import annotations

from benchmarks.bench_operator import listed, operator_env

from ioc_operator.model.config import OperatorConfig


def test_an_address_is_listed_only_as_a_whole_entry():
    # issue 19, item 10: 198.19.5.1 was "still listed" while 198.19.5.17 was
    assert not listed("198.19.5.17 198.19.7.3", "198.19.5.1")
    assert not listed("198.19.5.10:5064", "198.19.5.1")
    assert not listed("", "198.19.5.1")
    assert listed("198.19.5.17 198.19.5.1", "198.19.5.1")
    assert listed("198.18.0.50:5070 198.19.5.17", "198.18.0.50")  # host mode: host:port


def test_the_operator_runs_in_the_mode_the_bench_measures():
    inherited = {"IOC_OPERATOR_NAME_SERVICE_ADDRESS": "198.19.0.53"}
    per_ioc = OperatorConfig.from_env({**inherited, **operator_env(None)})
    assert per_ioc.name_service_address is None
    constant = OperatorConfig.from_env({**inherited, **operator_env("198.19.0.99")})
    assert constant.name_service_address == "198.19.0.99"
