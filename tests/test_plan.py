"""Planning ``sglctl up``: backend choice, GPU groups, ports, command lines (no processes)."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
from fakes.fake_nvml import FakeNvml, h100s

from sglctl.gpus import GpuReport, detect_gpus
from sglctl.supervisor.config import UsageError, build_parser, parse_up_args, split_worker_args
from sglctl.supervisor.plan import (
    PlanError,
    assign_gpus,
    check_ports,
    choose_backend,
    make_plan,
    sim_default_model,
)

NO_GPU = detect_gpus(FakeNvml(init_error="NVML Shared Library Not Found"), env={})


def gpus(n: int) -> GpuReport:
    return detect_gpus(h100s(n), env={})


def test_real_sglang_command_lines_for_dp_tp_base_gpu_and_extra_args() -> None:
    cfg = parse_up_args(
        ["--model-path", "meta-llama/Llama-3.1-8B-Instruct", "--dp-size", "2", "--tp-size", "2",
         "--base-gpu-id", "4", "--worker-base-port", "32000", "--backend", "sglang",
         "--policy", "round_robin", "--",
         "--mem-fraction-static", "0.8", "--enable-torch-compile"]
    )  # fmt: skip
    plan = make_plan(cfg, gpus(8), has_sglang=True)
    assert plan.backend == "sglang"
    assert [w.gpu_ids for w in plan.workers] == [(4, 5), (6, 7)]
    assert [w.env for w in plan.workers] == [
        {"CUDA_VISIBLE_DEVICES": "4,5"},
        {"CUDA_VISIBLE_DEVICES": "6,7"},
    ]
    assert plan.workers[1].argv == (
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", "meta-llama/Llama-3.1-8B-Instruct",
        "--host", "127.0.0.1", "--port", "32001", "--tp-size", "2",
        "--mem-fraction-static", "0.8", "--enable-torch-compile",
    )  # fmt: skip
    assert plan.workers[1].url == "http://127.0.0.1:32001"
    # Router flags are kept for the router, worker args are not.
    assert cfg.router_args == ["--policy", "round_robin"]


def test_sim_workers_without_gpus_get_no_gpu_and_default_model() -> None:
    cfg = parse_up_args(["--dp-size", "3", "--", "--speedup", "10"])
    plan = make_plan(cfg, NO_GPU, has_sglang=False)
    assert plan.backend == "sim"
    assert "NVML found no usable GPU driver" in plan.backend_reason
    assert plan.model == sim_default_model()
    assert [w.port for w in plan.workers] == [31000, 31001, 31002]
    assert all(w.gpu_ids == () and w.env == {} for w in plan.workers)
    assert plan.workers[0].argv == (
        sys.executable, "-m", "sglctl", "sim-worker", "--host", "127.0.0.1", "--port", "31000",
        "--model-path", sim_default_model(), "--speedup", "10",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("requested", "n_gpus", "has_sglang", "expected", "says"),
    [
        ("auto", 4, True, "sglang", "4 detected GPU"),
        ("auto", 4, False, "sim", "sglang is not installed"),
        ("auto", 0, True, "sim", "NVML"),
        ("sim", 8, True, "sim", "--backend sim"),
    ],
)
def test_backend_choice(
    requested: str, n_gpus: int, has_sglang: bool, expected: str, says: str
) -> None:
    report = gpus(n_gpus) if n_gpus else NO_GPU
    backend, reason = choose_backend(requested, report, has_sglang)
    assert backend == expected
    assert says in reason
    assert "\n" not in reason


def test_explicit_sglang_without_gpu_or_package_is_refused() -> None:
    with pytest.raises(PlanError, match=r"needs GPUs.*--backend sim"):
        choose_backend("sglang", NO_GPU, True)
    with pytest.raises(PlanError, match="pip install"):
        choose_backend("sglang", gpus(2), False)


def test_too_many_gpus_requested_says_how_to_fix() -> None:
    with pytest.raises(
        PlanError, match=r"needs 8 GPUs, but 4 are available \(0,1,2,3\): lower --dp-size to 2"
    ):
        assign_gpus([0, 1, 2, 3], dp_size=4, tp_size=2, base_gpu_id=0)
    with pytest.raises(PlanError, match="lower --tp-size or --base-gpu-id"):
        assign_gpus([0, 1], dp_size=1, tp_size=2, base_gpu_id=1)
    assert assign_gpus([3, 1, 0, 2], 2, 1, 1) == [(1,), (0,)]


def test_real_sglang_needs_a_model_path() -> None:
    with pytest.raises(PlanError, match="--model-path"):
        make_plan(parse_up_args(["--backend", "sglang"]), gpus(1), has_sglang=True)


def test_taken_ports_are_refused_with_a_flag_to_change() -> None:
    cfg = parse_up_args(["--dp-size", "2", "--port", "30500", "--worker-base-port", "31000"])
    plan = make_plan(cfg, NO_GPU, has_sglang=False)
    taken = {31001}
    with pytest.raises(
        PlanError, match=r"port 31001 \(worker 1\) is already in use.*--worker-base-port 31100"
    ):
        check_ports(cfg, plan, is_free=lambda host, port: port not in taken)
    taken = {30500}
    with pytest.raises(PlanError, match=r"port 30500 \(the router\).*--port 30600"):
        check_ports(cfg, plan, is_free=lambda host, port: port not in taken)
    check_ports(cfg, plan, is_free=lambda host, port: True)


def test_port_clash_between_router_and_workers() -> None:
    cfg = parse_up_args(["--dp-size", "2", "--port", "31001"])
    plan = make_plan(cfg, NO_GPU, has_sglang=False)
    with pytest.raises(PlanError, match="wanted by both the router and worker 1"):
        check_ports(cfg, plan, is_free=lambda host, port: True)


def test_router_flags_are_validated_early_and_shared_ones_read() -> None:
    cfg = parse_up_args(
        [
            "--port",
            "30123",
            "--metrics-port",
            "29123",
            "--shutdown-grace-period-secs",
            "3",
            "--host",
            "0.0.0.0",
        ]
    )
    assert (cfg.port, cfg.metrics_port, cfg.shutdown_grace_period_secs) == (30123, 29123, 3.0)
    assert cfg.router_url == "http://127.0.0.1:30123"
    assert "--shutdown-grace-period-secs" in cfg.router_args
    with pytest.raises(SystemExit):
        parse_up_args(["--policy", "no_such_policy"])
    with pytest.raises(SystemExit):
        parse_up_args(["--no-such-flag"])
    with pytest.raises(UsageError, match="drop --worker-urls"):
        parse_up_args(["--worker-urls", "http://x:1"])


def test_split_worker_args_only_at_first_double_dash() -> None:
    assert split_worker_args(["--dp-size", "2", "--", "--x", "--", "y"]) == (
        ["--dp-size", "2"],
        ["--x", "--", "y"],
    )
    assert split_worker_args(["--dp-size", "2"]) == (["--dp-size", "2"], [])


def test_up_help_gives_every_flag_a_help_text_and_one_default() -> None:
    parser = build_parser()
    text = " ".join(parser.format_help().split())  # unwrapped
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = action.option_strings[0]
        assert action.help, f"{flag} has no help text"
        if action.default is argparse.SUPPRESS:  # then the help text itself names it
            assert "default" in action.help or flag == "--model-path", flag
        else:  # the formatter appends it; None would read "(default: None)"
            assert action.default is not None, flag
    for flag in ("--host", "--port", "--metrics-port", "--worker-health-timeout-secs"):
        assert f"{flag} " in text
    assert text.count("<time>-<port>") == 1 and "default: None" not in text
    assert "(default: 1800.0)" in text  # --worker-startup-timeout-secs


def test_router_address_flags_shown_by_up_still_reach_the_router() -> None:
    cfg = parse_up_args(["--host", "127.0.0.2", "--port", "30124", "--metrics-port", "29124"])
    assert (cfg.host, cfg.port, cfg.metrics_port) == ("127.0.0.2", 30124, 29124)
    up_policy = ["--policy", "least_ttft"]
    address = ["--host", "127.0.0.2", "--port", "30124", "--metrics-port", "29124"]
    assert cfg.router_args == [*up_policy, *address]
    # Router defaults stay the router's, but for the policy: sglctl up runs least_ttft ...
    assert parse_up_args([]).router_args == up_policy
    # ... unless told otherwise, in either spelling, and PD mode keeps the router's default.
    assert parse_up_args(["--policy", "round_robin"]).router_args == ["--policy", "round_robin"]
    assert parse_up_args(["--policy=random"]).router_args == ["--policy", "random"]
    pd = parse_up_args(["--prefill-dp", "1", "--decode-dp", "1"])
    assert "--policy" not in pd.router_args
    assert "--policy" not in parse_up_args(["--kv-events"]).router_args


def test_every_port_conflict_is_reported_at_once() -> None:
    cfg = parse_up_args(["--dp-size", "2", "--port", "30500", "--metrics-port", "29500"])
    plan = make_plan(cfg, NO_GPU, has_sglang=False)
    taken = {30500, 29500, 31000, 31001}
    with pytest.raises(PlanError) as info:
        check_ports(cfg, plan, is_free=lambda host, port: port not in taken)
    message = str(info.value)
    assert "4 port problems" in message
    for flag in ("--port 30600", "--metrics-port 29600", "--worker-base-port 31100"):
        assert f"pass {flag}" in message, message


def test_kv_events_give_each_worker_its_own_ports_and_a_page_size() -> None:
    cfg = parse_up_args(["--dp-size", "2", "--kv-events", "--kv-events-base-port", "6000"])
    plan = make_plan(cfg, NO_GPU, has_sglang=False)
    configs = []
    for w in plan.workers:
        i = w.argv.index("--kv-events-config")
        configs.append(json.loads(w.argv[i + 1]))
        assert w.argv[w.argv.index("--page-size") + 1] == "64"
    assert configs == [
        {"publisher": "zmq", "endpoint": "tcp://127.0.0.1:6000",
         "replay_endpoint": "tcp://127.0.0.1:6001"},
        {"publisher": "zmq", "endpoint": "tcp://127.0.0.1:6002",
         "replay_endpoint": "tcp://127.0.0.1:6003"},
    ]  # fmt: skip
    assert "--kv-events" in cfg.router_args  # the router subscribes
    # A taken events port names its flag; without --kv-events no worker publishes.
    with pytest.raises(PlanError, match=r"port 6003 \(worker 1's KV events replay server\)"):
        check_ports(cfg, plan, is_free=lambda host, port: port != 6003)
    plain = make_plan(parse_up_args(["--dp-size", "2"]), NO_GPU, has_sglang=False)
    assert all("--kv-events-config" not in w.argv for w in plain.workers)


def test_kv_events_keep_the_users_page_size_and_refuse_one_config_for_all() -> None:
    cfg = parse_up_args(["--dp-size", "1", "--kv-events", "--", "--page-size", "16"])
    (worker,) = make_plan(cfg, NO_GPU, has_sglang=False).workers
    assert worker.argv.count("--page-size") == 1
    assert worker.argv[worker.argv.index("--page-size") + 1] == "16"
    with pytest.raises(UsageError, match="pass the router's --kv-events instead"):
        parse_up_args(["--dp-size", "2", "--", "--kv-events-config", '{"publisher":"zmq"}'])
