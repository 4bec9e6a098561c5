"""tests/test_router_app.py again, every test on the callback path (sglctl/router/direct.py).

test_fastpath_app.py runs those tests over a real socket with the lean protocol, but mostly
with the httpx upstream (an injected transport), which never takes the callback path: it
needs the native client. Here every test runs with stubs on real sockets and the native
client, so its requests (errors, retries, admission, headers, metrics, breakers) go through
the callback path whenever a keep-alive connection to the chosen stub is idle, and through
the task path for the first request to each stub.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

# Re-collected here, so that they run with this module's ``harness``.
from test_fastpath_app import *  # noqa: F403
from test_fastpath_app import lean_harness

# Not repeated here: these name their workers by the httpx harness's ``http://<stub>`` URLs
# (registry look-ups, admin calls, metric labels, PD pairs), which real sockets do not have.
for _name in (
    "test_unhealthy_workers_are_503",
    "test_circuit_breaker_takes_a_failing_worker_out",
    "test_admin_add_list_remove",
    "test_admin_0_3_2_style_workers_api",
    "test_api_key_guards_admin_calls",
    "test_set_available_takes_effect_for_the_next_request",
    "test_metrics_and_stats",
    "test_pd_sends_both_with_bootstrap_and_answers_from_decode",
    "test_pd_batch_gets_one_room_per_prompt",
    "test_pd_failures",
    "test_add_worker_not_ready_yet_is_202_pending_then_admitted",
):
    globals().pop(_name, None)


@pytest.fixture(params=["native"])
def harness(request: pytest.FixtureRequest) -> Callable[..., object]:
    """test_router_app's harness: stubs on real sockets, the native client, the lean server."""
    return lean_harness(request.param)
