"""sglctl: launch, supervise and cache-aware-route SGLang data-parallel workers."""

__version__ = "0.1.0"
