"""The package's shared pieces: CLI entry point, network and process-tree helpers."""

from __future__ import annotations

import socket
import subprocess
import sys

import psutil
from typer.testing import CliRunner

from sglctl import __version__
from sglctl.cli import app
from sglctl.net import find_free_port, port_is_free
from sglctl.proctree import terminate_tree


def test_version_flag_prints_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_port_is_free_sees_a_listener() -> None:
    port = find_free_port()
    assert port_is_free("127.0.0.1", port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert not port_is_free("127.0.0.1", port)


def test_terminate_tree_stops_children_too() -> None:
    # A parent that forks a grandchild and ignores nothing: both must be gone afterwards.
    code = (
        "import subprocess, sys, time;"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        "time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        proc = psutil.Process(parent.pid)
        deadline_children: list[psutil.Process] = []
        for _ in range(200):
            deadline_children = proc.children(recursive=True)
            if deadline_children:
                break
            psutil.wait_procs([], timeout=0.02)
        assert deadline_children, "the child never started"
        terminate_tree(parent.pid, timeout=5)
        parent.wait(timeout=5)
        assert not any(
            child.is_running() and child.status() != psutil.STATUS_ZOMBIE
            for child in deadline_children
        )
    finally:
        if parent.poll() is None:
            parent.kill()
