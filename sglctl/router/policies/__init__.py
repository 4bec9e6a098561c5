"""Routing policies behind one interface (:class:`Policy`) and the factory that builds them."""

from __future__ import annotations

from sglctl.router.config import RouterConfig
from sglctl.router.policies.base import NO_KEY, Policy, RouteKey
from sglctl.router.policies.cache_aware import CacheAwarePolicy
from sglctl.router.policies.least_ttft import LeastTTFTPolicy
from sglctl.router.policies.simple import (
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    ShortestQueuePolicy,
)

__all__ = [
    "NO_KEY",
    "CacheAwarePolicy",
    "LeastTTFTPolicy",
    "Policy",
    "PowerOfTwoPolicy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "RouteKey",
    "ShortestQueuePolicy",
    "make_policy",
]


def make_policy(name: str, config: RouterConfig) -> Policy:
    """Build the policy called ``name`` (a ``--policy`` choice) from the router config."""
    if name == "cache_aware":
        return CacheAwarePolicy(
            cache_threshold=config.cache_threshold,
            balance_abs_threshold=config.balance_abs_threshold,
            balance_rel_threshold=config.balance_rel_threshold,
            eviction_interval_secs=config.eviction_interval_secs,
            max_tree_size=config.max_tree_size,
            placement=config.placement,
            placement_epsilon=config.placement_epsilon,
            placement_key_blocks=config.placement_key_blocks,
            trim_from_reports=config.cached_tokens_correction,
            load_from_workers=config.worker_load_correction,
        )
    if name == "least_ttft":
        return LeastTTFTPolicy(
            eviction_interval_secs=config.eviction_interval_secs,
            max_tree_size=config.max_tree_size,
        )
    simple: dict[str, type[Policy]] = {
        "round_robin": RoundRobinPolicy,
        "random": RandomPolicy,
        "power_of_two": PowerOfTwoPolicy,
        "shortest_queue": ShortestQueuePolicy,
    }
    if name not in simple:
        raise ValueError(f"unknown routing policy {name!r}")
    return simple[name]()
