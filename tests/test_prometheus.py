"""The router's metrics as a real Prometheus sees them, and examples/monitoring kept in step.

* A real Prometheus server (Debian's ``prometheus`` package, installed by the session fixture
  when missing) scrapes a real router every second while known traffic goes through sim
  workers: successes (some streamed), 400s, and 502s from a worker that fails every request
  (retries off). Then the SGLang Router's four seed queries and the new histograms are asked
  through ``/api/v1/query`` and compared with the traffic.
* ``promtool check rules`` passes on examples/monitoring/alerts.yml.
* Every metric the Grafana dashboard and the alert rules use is exported by a running router.

Why the traffic comes in two rounds, the first before Prometheus starts: a counter series
that first appears with a value already in it has no increase to ``rate()`` (Prometheus does
not assume it started from 0), and series that first appear in different scrapes are
extrapolated differently. Round one creates every series (with more in each than round two
adds, so no zero-point clipping of the extrapolation applies); all are then first scraped
together, and ``rate()`` ratios over round two are exact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sglctl.net import find_free_port
from tests.support import wait_until

pytestmark = pytest.mark.timeout(180)

MONITORING = Path(__file__).resolve().parent.parent / "examples" / "monitoring"
PROMPT = "You are a helpful assistant. Answer briefly and precisely. " * 4


@pytest.fixture(scope="session")
def prometheus_tools() -> tuple[str, str]:
    """Paths of ``prometheus`` and ``promtool``; installs Debian's package when missing."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if all(found):
        return found  # type: ignore[return-value]
    if not shutil.which("apt-get"):
        pytest.skip("prometheus is not installed and there is no apt-get to install it")
    if os.geteuid() != 0:
        pytest.skip("prometheus is not installed; run `apt-get install prometheus` as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd, timeout in (
        (["apt-get", "update", "-qq"], 300),
        (["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"], 900),
    ):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            pytest.skip(f"cannot install prometheus ({' '.join(cmd)}): {done.stderr[-500:]}")
    found = shutil.which("prometheus"), shutil.which("promtool")
    if not all(found):
        pytest.skip("apt-get installed prometheus but prometheus/promtool are not on PATH")
    return found  # type: ignore[return-value]


# -- examples/monitoring ---------------------------------------------------------------------
def test_alert_rules_and_scrape_config_pass_promtool(prometheus_tools: tuple[str, str]) -> None:
    promtool = prometheus_tools[1]
    for args in (
        ["check", "rules", str(MONITORING / "alerts.yml")],
        ["check", "config", str(MONITORING / "prometheus.yml")],
    ):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def used_metric_names() -> dict[str, set[str]]:
    """Every ``sglang_router_*`` name the dashboard and the rules use, by file."""
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    import yaml

    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    rule_exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    pattern = re.compile(r"\bsglang_router_[a-z0-9_]+")
    return {
        "grafana-dashboard.json": {n for e in exprs for n in pattern.findall(e)},
        "alerts.yml": {n for e in rule_exprs for n in pattern.findall(e)},
    }


def exported_names(text: str) -> set[str]:
    """Sample names a scrape of ``text`` can give, from its ``# TYPE`` lines (so that a
    family with no sample yet, e.g. restarts without a supervisor, still counts)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    return names


def test_dashboard_and_rules_use_only_exported_metrics(procs) -> None:  # type: ignore[no-untyped-def]
    worker = procs.sim_worker("--speedup", "100")
    router = procs.router([worker.url])
    text = httpx.get(f"{router.url}/metrics", timeout=10, trust_env=False).text
    exported = exported_names(text)
    used = used_metric_names()
    assert used["grafana-dashboard.json"] and used["alerts.yml"]
    for source, names in used.items():
        missing = sorted(names - exported)
        assert not missing, f"{source} uses metrics the router does not export: {missing}"


def test_exported_names_sees_histograms_and_empty_families() -> None:
    text = (
        "# HELP a_seconds x\n# TYPE a_seconds histogram\n# HELP b_total y\n# TYPE b_total counter\n"
    )
    assert exported_names(text) == {
        "a_seconds",
        "a_seconds_bucket",
        "a_seconds_sum",
        "a_seconds_count",
        "b_total",
    }


# -- a real Prometheus -----------------------------------------------------------------------
class Prom:
    """A Prometheus server's HTTP API."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=10, trust_env=False)

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = self.client.get("/api/v1/query", params={"query": expr})
        assert r.status_code == 200, f"{expr}: {r.text}"
        body = r.json()
        assert body["status"] == "success", f"{expr}: {body}"
        return list(body["data"]["result"])

    def scalar(self, expr: str) -> float | None:
        """The value of a query giving one series (None when it gives none)."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} gave {len(result)} series: {result}"
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def prometheus(procs, tmp_path: Path, prometheus_tools: tuple[str, str]) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    """``start(target)``: a Prometheus scraping ``target`` (host:port) every second."""

    def start(target: str) -> Prom:
        port = find_free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: ['{MONITORING / 'alerts.yml'}']\n"
            "scrape_configs:\n  - job_name: sglctl-router\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        procs.spawn(
            "prometheus",
            [
                prometheus_tools[0],
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            url=f"http://127.0.0.1:{port}",
            health_path="/-/ready",
            ready_timeout=60,
        )
        return Prom(f"http://127.0.0.1:{port}")

    yield start


def router_value(client: httpx.Client, name: str) -> float:
    """Sum of every sample of ``name`` on the router's own /metrics."""
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        match = re.match(rf"{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match:
            total += float(match.group(2))
    return total


def test_real_prometheus_answers_the_seed_queries(procs, prometheus) -> None:  # type: ignore[no-untyped-def]
    good = [procs.sim_worker("--speedup", "100") for _ in range(2)]
    bad = procs.sim_worker("--speedup", "100", "--error-rate", "1")
    metrics_port = find_free_port()
    router = procs.router(
        [w.url for w in good],
        "--metrics-port",
        str(metrics_port),
        "--disable-retries",
        "--disable-circuit-breaker",
        "--disable-health-check",
    )
    client = httpx.Client(base_url=router.url, timeout=30, trust_env=False)

    def use_workers(urls: list[str]) -> None:
        current = set(client.get("/list_workers").json()["urls"])
        for url in sorted(set(urls) - current):
            assert client.post("/add_worker", params={"url": url}).status_code == 200
        for url in sorted(current - set(urls)):
            assert client.post("/remove_worker", params={"url": url}).status_code == 200

    def traffic(successes: int, streamed: int, bad_json: int, failures: int) -> None:
        use_workers([w.url for w in good])
        for i in range(successes):
            stream = i < streamed
            body = {
                "text": PROMPT + f"question {i}",
                "sampling_params": {"max_new_tokens": 8},
                "stream": stream,
            }
            r = client.post("/generate", json=body)
            assert r.status_code == 200, r.text
        for _ in range(bad_json):
            r = client.post("/generate", content=b"{not json")
            assert r.status_code == 400, r.text
        use_workers([bad.url])
        for i in range(failures):
            r = client.post("/generate", json={"text": f"fail {i}"})
            assert r.status_code == 502, r.text
        use_workers([w.url for w in good])

    try:
        # Round one, before Prometheus: every series exists when it is first scraped.
        traffic(successes=20, streamed=6, bad_json=4, failures=4)
        prom = prometheus(f"127.0.0.1:{metrics_port}")
        wait_until(
            lambda: prom.scalar("sum(sglang_router_requests_total)") == 28,
            timeout=60,
            what="Prometheus's first scrape of the router",
        )
        hits_before = router_value(client, "sglang_router_cache_hits_total")
        # Round two: what rate() sees.
        traffic(successes=10, streamed=3, bad_json=2, failures=2)
        hits_delta = router_value(client, "sglang_router_cache_hits_total") - hits_before
        assert hits_delta > 0, "the shared prompt should give cache hits in round two"
        wait_until(
            lambda: prom.scalar("sum(sglang_router_requests_total)") == 42,
            timeout=60,
            what="Prometheus's scrape after round two",
        )
        ttft = "sglang_router_time_to_first_token_seconds"
        wait_until(
            lambda: prom.scalar(f"sum(increase({ttft}_count[5m]))") not in (None, 0.0),
            timeout=30,
            what="a second sample of every series",
        )

        # Raw counters: exactly the traffic sent, with status and code in their own labels.
        by_status = {
            (s["metric"]["status"], s["metric"]["code"]): float(s["value"][1])
            for s in prom.query("sum by (status, code) (sglang_router_requests_total)")
        }
        assert by_status == {("success", "200"): 30, ("client_error", "400"): 6,
                             ("upstream_error", "502"): 6}  # fmt: skip

        # Seed query 1, as written: one-to-one matching divides each success series by
        # itself (1.0); the success *ratio* needs the sum() form the README gives.
        as_written = prom.query(
            'rate(sglang_router_requests_total{status="success"}[5m]) '
            "/ rate(sglang_router_requests_total[5m])"
        )
        assert as_written and all(s["metric"]["status"] == "success" for s in as_written)
        assert all(float(s["value"][1]) == pytest.approx(1.0) for s in as_written)
        ratio = prom.scalar(
            'sum(rate(sglang_router_requests_total{status="success"}[5m])) '
            "/ sum(rate(sglang_router_requests_total[5m]))"
        )
        assert ratio == pytest.approx(10 / 14, rel=1e-6)

        # Seed query 2, as written: one series per route (here one), a sensible p95.
        p95 = prom.query(
            "histogram_quantile(0.95, rate(sglang_router_request_duration_seconds_bucket[5m]))"
        )
        assert [s["metric"].get("route") for s in p95] == ["/generate"]
        assert 0 < float(p95[0]["value"][1]) < 30

        # Seed query 3, as written: one series per worker, idle now.
        pending = prom.query("sglang_router_worker_pending_requests")
        assert {s["metric"]["worker"] for s in pending} == {w.url for w in good}
        assert all(float(s["value"][1]) == 0 for s in pending)

        # Seed query 4, as written: hits carry requests_total's labels, so it gives one hit
        # ratio per route and outcome; the successful /generate requests hit in round two.
        as_written = {
            (r["metric"]["status"], r["metric"]["code"]): float(r["value"][1])
            for r in prom.query(
                "rate(sglang_router_cache_hits_total[5m]) / rate(sglang_router_requests_total[5m])"
            )
        }
        assert ("success", "200") in as_written
        assert all(0.0 <= v <= 1.0 for v in as_written.values()), as_written
        assert as_written[("success", "200")] > 0
        hit_ratio = prom.scalar(
            "sum(rate(sglang_router_cache_hits_total[5m])) "
            "/ sum(rate(sglang_router_requests_total[5m]))"
        )
        assert hit_ratio == pytest.approx(hits_delta / 14, rel=1e-6)

        # The new histograms: TTFT for every success, TPOT for the streams (they report
        # completion_tokens), duration for everything.
        assert prom.scalar(f"sum({ttft}_count)") == 30
        tpot = "sglang_router_time_per_output_token_seconds"
        assert prom.scalar(f"sum({tpot}_count)") == 9
        assert prom.scalar("sum(sglang_router_request_duration_seconds_count)") == 42
        for name in (ttft, tpot):
            value = prom.scalar(f"histogram_quantile(0.95, sum by (le) (rate({name}_bucket[5m])))")
            assert value is not None and 0 < value < 30, (name, value)
        assert prom.scalar("sglang_router_healthy_workers") == 2

        # The example alert rules evaluate cleanly against the real series, and the
        # success-ratio alert is pending: 10 of 12 router/worker-caused outcomes succeeded.
        def rules() -> list[dict[str, Any]]:
            groups = prom.client.get("/api/v1/rules").json()["data"]["groups"]
            return [rule for group in groups for rule in group["rules"]]

        wait_until(
            lambda: any(
                r["name"] == "SglctlLowSuccessRatio" and r["state"] != "inactive" for r in rules()
            ),
            timeout=30,
            what="the success-ratio alert to become pending",
        )
        assert {r["name"]: r["health"] for r in rules()} == {
            "SglctlNoHealthyWorker": "ok",
            "SglctlLowSuccessRatio": "ok",
            "SglctlWorkerCrashLooping": "ok",
            "SglctlQueueFull": "ok",
        }
        assert {r["name"] for r in rules() if r["state"] != "inactive"} == {"SglctlLowSuccessRatio"}
    finally:
        client.close()
