"""The tests' launcher for multi-process children (helpers.run_process_group): a hung child is killed
with everything it started, and the test fails with its output."""

from __future__ import annotations

import os
import re
import sys
import time

import pytest
from helpers import run_process_group


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has stopped running
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_hung_child_is_killed_with_its_grandchildren():
    cmd = ["bash", "-c", "sleep 300 & echo grandchild $!; wait"]
    with pytest.raises(pytest.fail.Exception, match="still running after 2 s") as e:
        run_process_group(cmd, 2)
    pid = int(re.search(r"grandchild (\d+)", str(e.value)).group(1))
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the grandchild outlived the timeout"


def test_a_finished_child_returns_its_output():
    r = run_process_group([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], 60,
                          env=dict(os.environ))
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
