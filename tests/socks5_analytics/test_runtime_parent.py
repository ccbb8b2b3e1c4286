"""A component started by `up` stops when `up` dies, even by SIGKILL (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from socks5_analytics.runtime import STACK_PARENT_ENV

# The "up": starts a "component" that follows it, prints the component's pid, then waits.
_PARENT = textwrap.dedent("""
    import os, subprocess, sys
    child = subprocess.Popen(
        [sys.executable, "-c", sys.argv[1]],
        env=dict(os.environ, {env}=str(os.getpid())),
    )
    print(child.pid, flush=True)
    child.wait()
""").format(env=STACK_PARENT_ENV)

# The "component": follows its parent, writes "stopped" on SIGTERM, else sleeps.
_CHILD = textwrap.dedent("""
    import signal, sys, time
    from socks5_analytics.runtime import follow_stack_parent
    def stop(*_):
        print("stopped", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    follow_stack_parent()
    print("ready", flush=True)
    time.sleep(60)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_component_stops_when_up_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD], stdout=subprocess.PIPE,
                              text=True)
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "ready"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    # The child shares the pipe: its SIGTERM handler's line arrives there.
    assert parent.stdout.readline().strip() == "stopped"
    deadline = time.monotonic() + 10
    while _alive(child_pid):
        assert time.monotonic() < deadline, "the component outlived `up`"
        time.sleep(0.05)
    parent.stdout.close()


def test_a_component_whose_up_is_already_gone_stops() -> None:
    """`up` died between starting the component and its prctl: nobody would signal it."""
    child = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, **{STACK_PARENT_ENV: "1"}),  # not our parent: gone
    )
    assert child.stdout.split() == ["stopped"]


def test_outside_up_the_component_runs_on() -> None:
    env = {k: v for k, v in os.environ.items() if k != STACK_PARENT_ENV}
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE,
                             text=True, env=env)
    assert child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
