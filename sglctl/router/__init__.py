"""The sglctl router: a drop-in for the SGLang Router (flags, endpoints, errors).

Modules: :mod:`config` (flags -> ``RouterConfig``), :mod:`workers` (the registry),
:mod:`tree` and :mod:`policies` (routing), :mod:`proxy` (the forwarding loop),
:mod:`app`/:mod:`inference`/:mod:`admin`/:mod:`info` (HTTP), :mod:`main` (entry point).
This package must not import ``sglctl.supervisor`` or ``sglctl.sim``.
"""
