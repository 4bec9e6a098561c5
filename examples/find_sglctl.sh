# Sourced by the example scripts: sets SGLCTL to a command that runs sglctl, so that they work
# from a fresh clone without an activated venv. Looks, in order, at: $SGLCTL as given; `sglctl`
# on PATH; this clone's .venv/bin/sglctl; the sglctl next to python3 on PATH. Neither: says how
# to install it and exits 2. (A bare `sglctl` that is not on PATH is never run: bash would try
# the clone's sglctl/ package directory and fail with "Is a directory".)
find_sglctl() {
  [ -n "${SGLCTL:-}" ] && return 0
  local clone py
  clone=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if SGLCTL=$(type -P sglctl); then return 0; fi
  if [ -x "$clone/.venv/bin/sglctl" ]; then SGLCTL="$clone/.venv/bin/sglctl"; return 0; fi
  if py=$(type -P python3) && [ -x "$(dirname "$py")/sglctl" ]; then
    SGLCTL="$(dirname "$py")/sglctl"; return 0
  fi
  cat >&2 <<MSG
error: sglctl not found (not on PATH, not in $clone/.venv/bin, not next to python3).
Install it into the clone's venv, from $clone:
    python3 -m venv .venv && .venv/bin/pip install -e .
or activate the venv it is in, or set SGLCTL=/path/to/sglctl.
MSG
  exit 2
}
find_sglctl
