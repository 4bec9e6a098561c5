"""``sglctl up`` with a PD layout: the plan (no processes), then end to end on sim workers.

The plan tests pin the rules with a fake NVML: prefill workers take the first GPU groups and
ports, every prefill its own bootstrap port, the exact SGLang command line of each role, and
every refused combination says what to change. The end-to-end tests start ``sglctl up
--prefill-dp P --decode-dp D`` as a subprocess (the fixture of ``test_up.py``) and check that
requests really go through a KV handover, that a killed prefill comes back on its bootstrap
port, and that ``add-worker --local --role decode`` grows the decode pool.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes.fake_nvml import h100s

from sglctl.gpus import detect_gpus
from sglctl.net import find_free_port_block
from sglctl.router.flags import parse_args as parse_router_args
from sglctl.state_table import WorkerState
from sglctl.supervisor.config import UsageError, build_parser, parse_up_args
from sglctl.supervisor.plan import PlanError, WorkerFactory, check_ports, make_plan
from sglctl.supervisor.router_proc import router_command
from tests.support import wait_until
from tests.test_up import SGLCTL, Up, served_by, up_runner

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture
def start_up(tmp_path: Path) -> Iterator[Callable[..., Up]]:
    with up_runner(tmp_path) as start:
        yield start


def _pd_config(*flags: str, worker_args: tuple[str, ...] = ()) -> Any:
    return parse_up_args([*flags, "--", *worker_args] if worker_args else list(flags))


# -- the plan ---------------------------------------------------------------------------------
def test_pd_plan_puts_prefill_first_with_distinct_bootstrap_ports_and_exact_commands() -> None:
    transfer = ("--disaggregation-transfer-backend", "mooncake",
                "--disaggregation-ib-device", "mlx5_0")  # fmt: skip
    cfg = _pd_config(
        "--model-path", MODEL, "--prefill-dp", "2", "--decode-dp", "2", "--tp-size", "2",
        "--backend", "sglang", "--worker-base-port", "32000", "--bootstrap-base-port", "9100",
        worker_args=transfer,
    )  # fmt: skip
    plan = make_plan(cfg, detect_gpus(h100s(8), env={}), has_sglang=True)
    assert [(w.role, w.gpu_ids, w.port, w.bootstrap_port) for w in plan.workers] == [
        ("prefill", (0, 1), 32000, 9100),
        ("prefill", (2, 3), 32001, 9101),
        ("decode", (4, 5), 32002, None),
        ("decode", (6, 7), 32003, None),
    ]
    assert plan.workers[1].env == {"CUDA_VISIBLE_DEVICES": "2,3"}
    common = ("--model-path", MODEL, "--host", "127.0.0.1")
    assert plan.workers[1].argv == (
        sys.executable, "-m", "sglang.launch_server", *common, "--port", "32001",
        "--tp-size", "2", "--disaggregation-mode", "prefill",
        "--disaggregation-bootstrap-port", "9101", *transfer,
    )  # fmt: skip
    assert plan.workers[2].argv == (
        sys.executable, "-m", "sglang.launch_server", *common, "--port", "32002",
        "--tp-size", "2", "--disaggregation-mode", "decode", *transfer,
    )  # fmt: skip
    assert cfg.max_workers >= 4


def test_pd_plan_without_gpus_runs_sim_workers_with_the_same_flags() -> None:
    cfg = _pd_config("--prefill-dp", "1", "--decode-dp", "2", worker_args=("--speedup", "10"))
    plan = make_plan(cfg, detect_gpus(h100s(0), env={}), has_sglang=False)
    assert plan.backend == "sim"
    assert [w.role for w in plan.workers] == ["prefill", "decode", "decode"]
    assert cfg.bootstrap_base_port == 8998  # SGLang's own default
    prefill, decode = plan.workers[0].argv, plan.workers[1].argv
    assert prefill[3:] == (
        "sim-worker", "--host", "127.0.0.1", "--port", "31000", "--model-path", plan.model,
        "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", "8998",
        "--speedup", "10",
    )  # fmt: skip
    assert decode[-4:] == ("--disaggregation-mode", "decode", "--speedup", "10")


def test_the_router_runs_in_pd_mode_fed_by_the_table() -> None:
    cfg = _pd_config("--prefill-dp", "1", "--decode-dp", "1", "--prefill-policy", "round_robin")
    argv = router_command(cfg.router_args, "sglctl_30000", pd=cfg.is_pd)
    assert argv[-4:] == ["round_robin", "--pd-disaggregation", "--state-table", "sglctl_30000"]
    router = parse_router_args(argv[3:])
    assert router.is_pd and router.prefill_servers == [] and router.decode_urls == []
    assert router.prefill_policy == "round_robin"
    # A plain router in PD mode still needs its workers named.
    with pytest.raises(SystemExit):
        parse_router_args(["--pd-disaggregation"])


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--dp-size", "2", "--prefill-dp", "1", "--decode-dp", "1"], "give one or the other"),
        (["--prefill-dp", "1"], "--prefill-dp needs --decode-dp too"),
        (["--decode-dp", "2"], "--decode-dp needs --prefill-dp too"),
        (["--pd-disaggregation"], "use --prefill-dp P --decode-dp D instead"),
        (["--dp-size", "2", "--mode", "pd"], "needs prefill and decode workers"),
        (["--prefill-dp", "1", "--decode-dp", "1", "--prefill", "http://x:1"], "drop --prefill"),
        (["--prefill-dp", "1", "--decode-dp", "1", "--", "--disaggregation-mode", "decode"],
         "sglctl up sets it per worker"),
        (["--dp-size", "2", "--", "--disaggregation-bootstrap-port=9000"],
         "drop it and use --prefill-dp P --decode-dp D"),
    ],
)  # fmt: skip
def test_contradictory_flags_are_usage_errors_that_say_what_to_do(
    argv: list[str], says: str
) -> None:
    with pytest.raises(UsageError, match=".*".join(map(_escape, says.split()))):
        parse_up_args(argv)


def _escape(word: str) -> str:
    import re

    return re.escape(word)


def test_zero_prefill_or_decode_workers_are_refused_by_the_parser() -> None:
    with pytest.raises(SystemExit):
        parse_up_args(["--prefill-dp", "0", "--decode-dp", "1"])


def test_router_mode_flags_that_agree_with_the_layout_are_accepted() -> None:
    assert not parse_up_args(["--mode", "regular"]).is_pd
    cfg = parse_up_args(["--prefill-dp", "1", "--decode-dp", "1", "--pd-disaggregation"])
    assert cfg.is_pd and cfg.n_workers == 2


@pytest.mark.parametrize(
    ("prefill", "decode", "tp", "says"),
    [
        (2, 3, 1, r"--prefill-dp 2 \+ --decode-dp 3 x --tp-size 1 .* needs 5 GPUs, but 4 are "
                  r"available \(0,1,2,3\): lower --decode-dp to 2"),
        (3, 1, 2, "at most 2 workers fit: e.g. --prefill-dp 1 --decode-dp 1"),
        (1, 1, 4, "a PD layout needs room for 2 workers"),
    ],
)  # fmt: skip
def test_a_pd_plan_that_does_not_fit_says_what_to_change(
    prefill: int, decode: int, tp: int, says: str
) -> None:
    cfg = _pd_config(
        "--model-path", MODEL, "--backend", "sglang", "--prefill-dp", str(prefill),
        "--decode-dp", str(decode), "--tp-size", str(tp),
    )  # fmt: skip
    with pytest.raises(PlanError, match=says):
        make_plan(cfg, detect_gpus(h100s(4), env={}), has_sglang=True)


def test_bootstrap_ports_are_checked_like_worker_ports() -> None:
    cfg = _pd_config("--prefill-dp", "2", "--decode-dp", "1", "--bootstrap-base-port", "9000")
    plan = make_plan(cfg, detect_gpus(h100s(0), env={}), has_sglang=False)
    with pytest.raises(
        PlanError,
        match=r"port 9001 \(worker 1's bootstrap server\) is already in use.*"
        r"--bootstrap-base-port 9100",
    ):
        check_ports(cfg, plan, is_free=lambda host, port: port != 9001)
    clash = _pd_config("--prefill-dp", "2", "--decode-dp", "1", "--bootstrap-base-port", "31002")
    clashing = make_plan(clash, detect_gpus(h100s(0), env={}), has_sglang=False)
    with pytest.raises(PlanError, match="wanted by both worker 2 and worker 0's bootstrap server"):
        check_ports(clash, clashing, is_free=lambda host, port: True)
    check_ports(cfg, plan, is_free=lambda host, port: True)


def test_added_workers_join_the_pool_named_by_their_role() -> None:
    pd = WorkerFactory("sglang", MODEL, 1, [0, 1, 2, 3], ["--x"], is_free=lambda h, p: p != 8999,
                       pd=True, bootstrap_base_port=8998)  # fmt: skip
    spec = pd.make(3, {31000, 31001, 31002}, {0, 1, 2}, 31000, role="prefill",
                   used_bootstrap_ports={8998})  # fmt: skip
    # 8998 belongs to a live prefill, 8999 is taken by something else.
    assert (spec.role, spec.port, spec.bootstrap_port, spec.gpu_ids) == (
        "prefill",
        31003,
        9000,
        (3,),
    )
    assert spec.argv[-5:] == ("--disaggregation-mode", "prefill",
                              "--disaggregation-bootstrap-port", "9000", "--x")  # fmt: skip
    decode = pd.make(4, {31000}, set(), 31000, role="decode")
    assert (decode.role, decode.bootstrap_port) == ("decode", None)
    with pytest.raises(PlanError, match="--role prefill or --role decode"):
        pd.make(5, set(), set(), 31000)
    regular = WorkerFactory("sim", "m", 1, [], [])
    assert regular.make(1, {31000}, set(), 31000).role == "regular"
    with pytest.raises(PlanError, match="needs a PD layout"):
        regular.make(1, {31000}, set(), 31000, role="decode")


def test_up_help_documents_the_pd_flags_with_defaults() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "--prefill-dp P prefill workers" in text and "--decode-dp D decode workers" in text
    assert "--bootstrap-base-port PORT" in text and "(default: 8998)" in text
    assert "[--dp-size N | --prefill-dp P --decode-dp D]" in text
    assert "--disaggregation-transfer-backend" in text  # where the transfer flags go


# -- end to end on sim workers ----------------------------------------------------------------
def _pd_flags(prefill: int, decode: int) -> tuple[str, ...]:
    bootstrap = find_free_port_block(prefill + 2, start=random.randrange(20000, 30000, 10))
    return ("--prefill-dp", str(prefill), "--decode-dp", str(decode),
            "--bootstrap-base-port", str(bootstrap))  # fmt: skip


def _generate(client: httpx.Client, url: str, text: str, stream: bool = False) -> httpx.Response:
    body = {"text": text, "sampling_params": {"max_new_tokens": 6}, "stream": stream}
    return client.post(url + "/generate", json=body)


def _transfers(client: httpx.Client, worker_url: str) -> int:
    info = client.get(worker_url + "/get_server_info").json()
    return int(info["disaggregation"]["transfers_ok"])


def _sse_events(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]


@pytest.mark.slow
def test_up_pd_1_1_serves_through_a_handover_and_stops_clean(start_up: Callable[..., Up]) -> None:
    up = start_up(*_pd_flags(1, 1), dp_size=None)
    with up.table() as table:
        roles = [(v.worker.role, v.worker.bootstrap_port) for v in table.read_slots()]
        prefill_url = table.read_worker(0).url
    bootstrap = int(_flag_value(up, "--bootstrap-base-port"))
    assert roles == [("prefill", bootstrap), ("decode", 0)]
    with httpx.Client(timeout=30) as client:
        r = _generate(client, up.url, "Hello there " * 10)
        assert r.status_code == 200, r.text
        assert r.json()["meta_info"]["completion_tokens"] == 6
        assert _transfers(client, prefill_url) == 1  # the answer came through a handover
    announced = " ".join(up.log().split())  # the terminal wraps lines
    assert "1 prefill + 1 decode simulated workers, router in PD mode" in announced
    assert up.interrupt() == 0, up.log()
    up.assert_nothing_left()


def _flag_value(up: Up, flag: str) -> str:
    args = list(up.popen.args)  # type: ignore[arg-type]
    return str(args[args.index(flag) + 1])


@pytest.mark.slow
def test_up_pd_1_2_serves_heals_the_prefill_and_grows_the_decode_pool(
    start_up: Callable[..., Up],
) -> None:
    up = start_up(*_pd_flags(1, 2), dp_size=None)
    bootstrap = int(_flag_value(up, "--bootstrap-base-port"))
    table = up.table()
    try:
        slots = [v.worker for v in table.read_slots()]
        assert [(s.role, s.state) for s in slots] == [
            ("prefill", WorkerState.HEALTHY),
            ("decode", WorkerState.HEALTHY),
            ("decode", WorkerState.HEALTHY),
        ]
        prefill = slots[0]
        with httpx.Client(timeout=30) as client:
            # /generate, whole and streamed, and streamed chat: each one a KV handover.
            whole = _generate(client, up.url, "The quick brown fox " * 8)
            assert whole.status_code == 200, whole.text
            assert whole.json()["meta_info"]["completion_tokens"] == 6
            streamed = _generate(client, up.url, "Jumps over the lazy dog " * 8, stream=True)
            assert streamed.status_code == 200, streamed.text
            events = _sse_events(streamed)
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["meta_info"]["completion_tokens"] == 6
            chat = {
                "model": "m",
                "messages": [{"role": "user", "content": "Tell me about PD " * 6}],
                "max_tokens": 5,
                "stream": True,
            }
            r = client.post(up.url + "/v1/chat/completions", json=chat)
            assert r.status_code == 200, r.text
            chunks = [json.loads(e) for e in _sse_events(r)[:-1]]
            assert _sse_events(r)[-1] == "[DONE]"
            assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            # Proof of real handovers: the prefill sent the KV of all three to a decode worker.
            assert _transfers(client, prefill.url) == 3
            info = client.get(prefill.url + "/get_server_info").json()
            assert info["disaggregation_bootstrap_port"] == bootstrap

            # kill -9 the prefill: restarted on the same bootstrap port, and serving again.
            os.kill(prefill.pid, signal.SIGKILL)
            back = wait_until(
                lambda: (
                    table.read_worker(0).pid != prefill.pid
                    and table.read_worker(0).state == WorkerState.HEALTHY
                ),
                30,
                "the prefill worker to be restarted and healthy",
            )
            restarted = table.read_worker(0)
            assert (restarted.restarts, restarted.bootstrap_port) == (1, bootstrap)
            info = client.get(prefill.url + "/get_server_info").json()
            assert info["disaggregation_bootstrap_port"] == bootstrap
            prompts = iter(range(10_000))
            back += wait_until(
                lambda: _generate(client, up.url, f"again {next(prompts)} " * 8).status_code == 200,
                10,
                "requests to work again through the restarted prefill",
                interval=0.1,
            )
            print(f"PD requests served again {back:.2f} s after kill -9 of the prefill")
            for i in range(3):
                r = _generate(client, up.url, f"after the restart {i} " * 8, stream=i == 1)
                assert r.status_code == 200, r.text
            assert _transfers(client, prefill.url) >= 4  # the new process's own handovers

            # add-worker --local --role decode: a third decode worker that then serves.
            added = subprocess.run(
                [*SGLCTL, "add-worker", "--local", "--role", "decode", "--router", up.url],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert added.returncode == 0, added.stderr + added.stdout
            assert "added decode worker 3 at http://127.0.0.1:" in added.stdout
            new_url = added.stdout.split(" at ")[1].split()[0]
            wait_until(
                lambda: new_url in served_by(client, up.url), 5, "the router to add the worker"
            )

            def new_worker_serves() -> bool:
                assert _generate(client, up.url, f"grow {next(prompts)} " * 8).status_code == 200
                return served_by(client, up.url)[new_url] > 0

            wait_until(new_worker_serves, 30, "the added decode worker to serve", interval=0)
            workers = client.get(up.url + "/workers").json()["workers"]
            assert sorted(w["worker_type"] for w in workers) == ["decode"] * 3 + ["prefill"]

        # sglctl status shows each worker's role (JSON and the dashboard's column).
        status = subprocess.run(
            [*SGLCTL, "status", "--router", up.url, "--json", "--sample-secs", "0"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        snapshot = json.loads(status.stdout)
        assert snapshot["source"].startswith("shared memory")
        assert [(w["role"], w["bootstrap_port"]) for w in snapshot["workers"]] == [
            ("prefill", bootstrap),
            ("decode", None),
            ("decode", None),
            ("decode", None),
        ]
        frame = subprocess.run(
            [*SGLCTL, "status", "--router", up.url, "--once", "--sample-secs", "0"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert frame.returncode == 0, frame.stderr
        assert f"prefill:{bootstrap}" in frame.stdout and frame.stdout.count("decode") >= 3
    finally:
        table.close()
    assert up.interrupt() == 0, up.log()
    up.assert_nothing_left()
