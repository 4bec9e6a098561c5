"""``sglctl sim-worker``: the Typer command (heavy imports happen only when it runs)."""

from __future__ import annotations

import typer

# SGLang server flags that `sglctl up` or a user may pass to a worker and that mean nothing
# to the simulation; they are accepted (and logged) instead of failing the launch.
EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def sim_worker(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(30000, help="Port to listen on."),
    model_path: str = typer.Option(
        "sim/Llama-3.1-8B-Instruct", help="Model name to report (nothing is loaded)."
    ),
    served_model_name: str | None = typer.Option(None, help="Name in OpenAI responses."),
    tokenizer_path: str | None = typer.Option(
        None,
        help="A tokenizer.json (or a directory holding one) to encode prompts with instead of "
        "the 4-character rule; anything else is only reported by /get_model_info.",
    ),
    page_size: int = typer.Option(
        1, help="KV cache page size in tokens, as SGLang's --page-size (KV events are per page)."
    ),
    kv_events_config: str | None = typer.Option(
        None,
        help="Publish KV cache events as SGLang does, e.g. "
        '\'{"publisher":"zmq","endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558"}\'.',
    ),
    kv_cache_tokens: int = typer.Option(
        444_500,
        "--kv-cache-tokens",
        "--max-total-tokens",
        help="KV cache pool size in tokens (SGLang's max_total_num_tokens).",
    ),
    max_running_requests: int = typer.Option(2049, help="Most requests decoding at once."),
    chunked_prefill_size: int = typer.Option(8192, help="Most new tokens in a prefill batch."),
    max_prefill_tokens: int = typer.Option(16384, help="Reported only (SGLang's flag)."),
    context_length: int = typer.Option(131_072, help="Longest prompt + output, in tokens."),
    speedup: float = typer.Option(1.0, help="Run simulated time this many times faster."),
    stream_interval: int = typer.Option(1, help="Stream a chunk every N tokens."),
    min_tick_ms: float = typer.Option(
        2.0, help="Scheduler wake-up granularity in wall ms (steps in one tick are batched)."
    ),
    prefill_base_ms: float = typer.Option(8.0, help="Fixed cost of a prefill batch (GPU ms)."),
    prefill_us_per_token: float = typer.Option(32.0, help="Prefill cost a new token (GPU us)."),
    prefill_ns_per_pair: float = typer.Option(
        1.06, help="Attention cost a (query, key) token pair in prefill (GPU ns)."
    ),
    decode_base_ms: float = typer.Option(6.5, help="Fixed cost of a decode step (GPU ms)."),
    decode_us_per_seq: float = typer.Option(30.0, help="Decode step cost a request (GPU us)."),
    decode_ns_per_ctx_token: float = typer.Option(
        49.0, help="Decode step cost a token of context (GPU ns)."
    ),
    crash_after: int | None = typer.Option(
        None, help="Exit abruptly when the N-th generation request arrives (unanswered)."
    ),
    error_rate: float = typer.Option(0.0, help="Answer 500 to this fraction of generations."),
    stall_after: int | None = typer.Option(
        None, help="After answering N generation requests, never answer anything again."
    ),
    disaggregation_mode: str = typer.Option(
        "null",
        "--disaggregation-mode",
        "--role",
        help="null (whole requests), prefill or decode (PD: KV hand-over, see sglctl.sim.disagg).",
    ),
    disaggregation_bootstrap_port: int = typer.Option(
        8998, help="Prefill: port of the bootstrap server decode workers fetch KV from."
    ),
    disaggregation_timeout: float = typer.Option(
        300.0,
        help="PD: seconds a decode waits for a room's KV, and a prefill holds KV for a decode.",
    ),
    kv_bytes_per_token: int = typer.Option(
        131072,
        help="KV bytes a token (2 x layers x kv_heads x head_dim x 2; Llama-3.1-8B BF16).",
    ),
    kv_link_gbps: float = typer.Option(400.0, help="PD: prefill-to-decode link speed, Gb/s."),
    kv_transfer_latency_ms: float = typer.Option(1.0, help="PD: fixed cost of a KV transfer."),
    seed: int = typer.Option(0, "--seed", "--random-seed", help="Seed of outputs and faults."),
    tp_size: int = typer.Option(1, "--tp-size", "--tp", help="Reported only."),
    dp_size: int = typer.Option(1, "--dp-size", "--dp", help="Reported only."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Run a simulated SGLang worker: same HTTP API, a radix KV cache and GPU-like timing."""
    from sglctl.logs import configure_logging
    from sglctl.sim.config import SimConfig
    from sglctl.sim.server import serve
    from sglctl.sim.timing import TimingModel
    from sglctl.sim.transfer import TransferModel

    try:
        configure_logging(log_level)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-level") from None
    try:
        timing = TimingModel(
            prefill_base_s=prefill_base_ms / 1e3,
            prefill_per_token_s=prefill_us_per_token / 1e6,
            prefill_per_pair_s=prefill_ns_per_pair / 1e9,
            decode_base_s=decode_base_ms / 1e3,
            decode_per_seq_s=decode_us_per_seq / 1e6,
            decode_per_ctx_token_s=decode_ns_per_ctx_token / 1e9,
            speedup=speedup,
        )
        config = SimConfig(
            host=host,
            port=port,
            model_path=model_path,
            served_model_name=served_model_name,
            tokenizer_path=tokenizer_path,
            page_size=page_size,
            kv_events_config=kv_events_config,
            kv_cache_tokens=kv_cache_tokens,
            max_running_requests=max_running_requests,
            chunked_prefill_size=chunked_prefill_size,
            max_prefill_tokens=max_prefill_tokens,
            context_length=context_length,
            timing=timing,
            min_tick_s=min_tick_ms / 1e3,
            stream_interval=stream_interval,
            crash_after=crash_after,
            error_rate=error_rate,
            stall_after=stall_after,
            disaggregation_mode=disaggregation_mode.lower(),
            bootstrap_port=disaggregation_bootstrap_port,
            disaggregation_timeout_s=disaggregation_timeout,
            transfer=TransferModel(
                kv_bytes_per_token=kv_bytes_per_token,
                link_gbps=kv_link_gbps,
                latency_ms=kv_transfer_latency_ms,
                speedup=speedup,
            ),
            seed=seed,
            tp_size=tp_size,
            dp_size=dp_size,
            log_level=log_level,
        )
    except ValueError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None
    serve(config, ignored_args=list(ctx.args))
