"""``sglctl.spawn``: the command lines it builds (the processes are tested end to end)."""

from __future__ import annotations

from sglctl.spawn import router_command


def metrics_ports(args: list[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == "--metrics-port"]


def test_each_router_gets_its_own_metrics_port_unless_one_is_given() -> None:
    # Without it every spawned router binds the default 29000: a second router on the host
    # (another test, another helper's run) fails its start-up with "address already in use".
    first = router_command(31000, ["http://127.0.0.1:1"], ["--policy", "round_robin"])
    second = router_command(31001, ["http://127.0.0.1:1"], [])
    (a,), (b,) = metrics_ports(first), metrics_ports(second)
    assert a != b and "29000" not in (a, b)
    assert first[-2:] == ["--policy", "round_robin"]

    given = router_command(31000, [], ["--metrics-port", "4242"])
    assert metrics_ports(given) == ["4242"]
    given_eq = router_command(31000, [], ["--metrics-port=4242"])
    assert metrics_ports(given_eq) == [] and "--metrics-port=4242" in given_eq
