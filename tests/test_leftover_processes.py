"""No process outlives a killed runner (issue 20, item 7).

Ray's ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent`` overwrite the memory that
``/proc/PID/environ`` shows with their process title, so the runtime's tag cannot be read from
them, and the raylet that started them may be gone first. These tests build the same situations
from real processes (``sleep`` and small Python programs) and check that
:class:`~flwr_distreal.run.processes.ProcessFamily` and the watchdog still find and stop them,
and leave alone what is not theirs. Every process a test starts is killed by PID at teardown.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc (Linux)")

from flwr_distreal.run.processes import (
    TAG_VAR,
    ProcessFamily,
    _read_stat,
    stop_family,
    tagged_pids,
)

REPO = Path(__file__).resolve().parents[1]


def _gone(pid: int) -> bool:
    stat = _read_stat(pid)
    return stat is None or stat.zombie


def _wait_gone(pids: list[int], within: float = 30.0) -> list[int]:
    """The PIDs still alive after waiting up to ``within`` seconds for all of them to end."""
    end = time.monotonic() + within
    while (left := [p for p in pids if not _gone(p)]) and time.monotonic() < end:
        time.sleep(0.1)
    return left


def _tagged(tag: str, *pids: int) -> None:
    """Wait until the processes show ``tag`` in ``/proc/PID/environ``: ``Popen`` returns as soon as
    ``exec`` has closed the child's descriptors, a moment before the kernel sets up its environment."""
    end = time.monotonic() + 30
    while set(pids) - set(tagged_pids(tag)) and time.monotonic() < end:
        time.sleep(0.02)
    assert not set(pids) - set(tagged_pids(tag)), f"{pids} never showed the tag"


@pytest.fixture
def reaper():
    """Remember (PID, start time) of every process a test starts; SIGKILL the live ones after it."""
    started: list[tuple[int, int]] = []

    def remember(*pids: int) -> None:
        for pid in pids:
            stat = _read_stat(pid)
            if stat is not None:
                started.append((pid, stat.start))

    yield remember
    for pid, start in started:
        stat = _read_stat(pid)
        if stat is not None and stat.start == start and not stat.zombie:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _env(tag: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != TAG_VAR}
    if tag is not None:
        env[TAG_VAR] = tag
    return env


# A session leader (like Flower's SuperExec) that carries the tag and starts a child without it
# (like a Ray agent, whose environ reads as zeros), prints the child's PID, then lives on for
# argv[2] seconds: exiting at once leaves the child orphaned, reparented and untagged, tied to the
# run only by its session.
_LEADER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    env = {k: v for k, v in os.environ.items() if k != sys.argv[1]}
    child = subprocess.Popen(["sleep", "300"], env=env)
    print(child.pid, flush=True)
    time.sleep(float(sys.argv[2]))
    """
)


def test_family_needs_a_tag() -> None:
    with pytest.raises(ValueError, match="tag"):
        ProcessFamily("")


def test_family_holds_the_tagged_processes_and_nothing_else(reaper) -> None:
    tag = uuid.uuid4().hex
    tagged = subprocess.Popen(["sleep", "300"], env=_env(tag))
    other_tag = subprocess.Popen(["sleep", "300"], env=_env(uuid.uuid4().hex))  # another run's
    stranger = subprocess.Popen(["sleep", "300"], env=_env(None), start_new_session=True)
    reaper(tagged.pid, other_tag.pid, stranger.pid)
    _tagged(tag, tagged.pid)
    assert ProcessFamily(tag).scan() == [tagged.pid]
    for proc in (tagged, other_tag, stranger):
        proc.kill()
        proc.wait()
    assert ProcessFamily(tag).scan() == []


def test_family_follows_a_session_seen_while_its_leader_lived(reaper) -> None:
    tag = uuid.uuid4().hex
    family = ProcessFamily(tag)
    leader = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.readline()\n" + _LEADER, TAG_VAR, "0"],
        env=_env(tag), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    reaper(leader.pid)
    _tagged(tag, leader.pid)
    assert family.scan() == [leader.pid]  # the tagged leader, before it starts anything
    leader.stdin.write("\n")
    leader.stdin.flush()
    orphan = int(leader.stdout.readline())
    reaper(orphan)
    leader.wait(30)
    end = time.monotonic() + 30
    while _read_stat(orphan).ppid == leader.pid and time.monotonic() < end:
        time.sleep(0.05)
    assert _read_stat(orphan).ppid != leader.pid, "the orphan should have been reparented"
    assert orphan not in tagged_pids(tag)
    assert family.scan() == [orphan]
    assert ProcessFamily(tag).scan() == [], "a family that never saw the leader has no way to the orphan"


def test_family_follows_the_children_of_its_members(reaper) -> None:
    tag = uuid.uuid4().hex
    parent = subprocess.Popen([sys.executable, "-c", _LEADER, TAG_VAR, "300"], env=_env(tag), stdout=subprocess.PIPE,
                              text=True)  # no session of its own: found by its parent only
    reaper(parent.pid)
    child = int(parent.stdout.readline())
    reaper(child)
    assert child not in tagged_pids(tag)
    assert ProcessFamily(tag).scan() == sorted([parent.pid, child])


def test_family_remembers_a_process_that_drops_its_tag(reaper) -> None:
    """A process found once stays found (PID and start time) after it re-executes without the tag."""
    tag = uuid.uuid4().hex
    code = (
        "import os, sys\n"
        "sys.stdin.readline()\n"
        f"env = {{k: v for k, v in os.environ.items() if k != {TAG_VAR!r}}}\n"
        "os.execvpe('sleep', ['sleep', '300'], env)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(tag), stdin=subprocess.PIPE, text=True)
    reaper(proc.pid)
    _tagged(tag, proc.pid)
    family = ProcessFamily(tag)
    assert family.scan() == [proc.pid]
    proc.stdin.write("\n")
    proc.stdin.flush()
    end = time.monotonic() + 30
    while proc.pid in tagged_pids(tag) and time.monotonic() < end:
        time.sleep(0.05)
    assert proc.pid not in tagged_pids(tag), "the process should have dropped its tag"
    assert family.scan() == [proc.pid]
    assert ProcessFamily(tag).scan() == []
    proc.kill()
    proc.wait()
    assert family.scan() == []


def test_stop_family_kills_what_ignores_sigterm(reaper) -> None:
    tag = uuid.uuid4().hex
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
         "print('ready', flush=True)\ntime.sleep(300)"],
        env=_env(tag), stdout=subprocess.PIPE, text=True,
    )
    reaper(stubborn.pid)
    polite = subprocess.Popen(["sleep", "300"], env=_env(tag))
    reaper(polite.pid)
    assert stubborn.stdout.readline().strip() == "ready"
    _tagged(tag, stubborn.pid, polite.pid)
    left = stop_family(ProcessFamily(tag), grace_s=0.5, kill_s=30)
    stubborn.wait(30)
    polite.wait(30)
    assert left == []
    assert stubborn.returncode == -signal.SIGKILL
    assert polite.returncode == -signal.SIGTERM


# An owner like the runner: a watchdog for its tag and temporary folder, a tagged child that
# ignores SIGTERM (like Ray's agents), and a tagged session leader (a SuperExec) with an untagged
# child (an agent whose environ reads as zeros); then it waits to be killed.
_OWNER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from pathlib import Path
    from flwr_distreal.run.processes import TAG_VAR, start_watchdog
    tag, folder = sys.argv[1], Path(sys.argv[2])
    watchdog = start_watchdog(os.getpid(), tag, folder)
    env = dict(os.environ, **{TAG_VAR: tag})
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"],
        env=env,
    )
    leader = subprocess.Popen([sys.executable, "-c", sys.argv[3], TAG_VAR, "300"], env=env,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    agent = int(leader.stdout.readline())
    print(watchdog.pid, stubborn.pid, leader.pid, agent, flush=True)
    time.sleep(300)
    """
)


def test_watchdog_stops_the_family_and_removes_the_folder_after_kill_9_of_the_owner(tmp_path, reaper) -> None:
    tag = uuid.uuid4().hex
    folder = tmp_path / "runtime"
    (folder / "ray").mkdir(parents=True)
    stranger = subprocess.Popen(["sleep", "300"], env=_env(None))  # this test's own: must survive
    reaper(stranger.pid)
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, tag, str(folder), _LEADER], env=_env(None), stdout=subprocess.PIPE,
        text=True, cwd=REPO,
    )
    reaper(owner.pid)
    watchdog, stubborn, leader, agent = (int(x) for x in owner.stdout.readline().split())
    reaper(watchdog, stubborn, leader, agent)
    assert agent not in tagged_pids(tag), "the environment alone would miss the agent"
    assert [p for p in (watchdog, stubborn, leader, agent) if _gone(p)] == []

    os.kill(owner.pid, signal.SIGKILL)
    owner.wait(30)
    assert _wait_gone([stubborn, leader, agent, watchdog]) == []
    assert not folder.exists()
    assert not _gone(stranger.pid)
    stranger.kill()
    stranger.wait()


def test_the_watchdog_of_a_runtime_stopped_normally_leaves_nothing(reaper) -> None:
    """``stop()`` ends the watchdog (it must not linger as a leftover either)."""
    from flwr_distreal.run.local_runtime import LocalFlwrRuntime

    runtime = LocalFlwrRuntime()
    watchdog = runtime._watchdog.pid
    reaper(watchdog)
    child = subprocess.Popen(["sleep", "300"], env=runtime.env, start_new_session=True)
    reaper(child.pid)
    _tagged(runtime.tag, child.pid)
    assert runtime.pids() == [child.pid]
    root = runtime.root
    assert runtime.stop(grace_s=5) == []
    child.wait(30)
    assert _wait_gone([watchdog]) == []
    assert not root.exists()


@pytest.mark.heavy
@pytest.mark.slow
def test_one_kill_9_trial_of_the_runner_leaves_no_process() -> None:
    """The real thing: ``python -m flwr_distreal.main`` (``flwr run`` with Ray), kill -9 once Ray's
    raylet runs; nothing of it may be left (checked by ``scripts/kill_trials.py``'s own search)."""
    kill_trials = _load_kill_trials()
    trial = kill_trials.one_trial(1, ["rounds=3"], "ray", limit=60.0, poll=0.5, startup=600.0)
    assert trial.error == ""
    assert trial.processes_at_kill >= 5, "the search should see the SuperLink, Ray and the watchdog"
    assert trial.left == []
    assert trial.folder_removed


# -- the measuring scripts -------------------------------------------------------------------------


def _load_kill_trials():
    """``scripts/kill_trials.py`` as a module (registered in ``sys.modules``: its dataclasses
    look their module up)."""
    if "kill_trials" not in sys.modules:
        spec = importlib.util.spec_from_file_location("kill_trials", REPO / "scripts" / "kill_trials.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kill_trials"] = module
        spec.loader.exec_module(module)
    return sys.modules["kill_trials"]


@pytest.mark.parametrize("script", ["kill_trials.py", "kill_and_resume.py"])
def test_kill_scripts_answer_help(script: str) -> None:
    res = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout and "kill -9" in res.stdout


def test_kill_trials_refuses_no_trials() -> None:
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "kill_trials.py"), "--trials", "0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "--trials must be >= 1" in res.stderr


def test_kill_trials_counts_the_runners_tree_its_sessions_and_its_folder(tmp_path, reaper) -> None:
    """The script's own search (not the runtime's tag): the runner (here a session leader), its
    child, still counted as an orphan after the runner's kill, a process naming the trial's
    folder; not a stranger."""
    kill_trials = _load_kill_trials()
    folder = str(tmp_path)
    runner = subprocess.Popen(
        [sys.executable, "-c", _LEADER, TAG_VAR, "300"], env=_env(None), stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    reaper(runner.pid)
    child = int(runner.stdout.readline())
    reaper(child)
    user = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", folder], env=_env(None))
    stranger = subprocess.Popen(["sleep", "300"], env=_env(None), start_new_session=True)
    reaper(user.pid, stranger.pid)
    run = kill_trials.RunProcesses(runner.pid, folder)
    end = time.monotonic() + 30  # the folder shows in the command line once exec is done
    while user.pid not in run.alive() and time.monotonic() < end:
        time.sleep(0.05)
    assert run.alive() == sorted([runner.pid, child, user.pid])
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait(30)
    user.kill()
    user.wait(30)
    assert run.alive() == [child], "the orphan of the killed runner is still the run's"
    assert stranger.pid not in run.alive()
    assert kill_trials.describe(child).startswith(f"{child} S sleep")


def test_watchdog_is_a_bare_interpreter():
    """The watchdog lives as long as the run: it must not load the package (torch, Flower), only
    the standard library, so its memory is a bare interpreter's."""
    from flwr_distreal.run.processes import start_watchdog

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    watchdog = start_watchdog(sleeper.pid, uuid.uuid4().hex)
    try:
        time.sleep(1.5)  # let it import what it imports
        assert watchdog.poll() is None, "the watchdog exited while its owner lives"
        maps = Path(f"/proc/{watchdog.pid}/maps").read_text()
        loaded = {line.split()[-1] for line in maps.splitlines() if line.split()[-1].endswith(".so") or ".so." in line}
        assert not [so for so in loaded if "torch" in so or "grpc" in so], sorted(loaded)
        rss_kb = int(next(l for l in Path(f"/proc/{watchdog.pid}/status").read_text().splitlines() if l.startswith("VmRSS")).split()[1])
        assert rss_kb < 60_000, f"watchdog RSS {rss_kb} kB"
        sleeper.kill()
        sleeper.wait()
        assert watchdog.wait(10) == 0, "the watchdog did not end after its owner"
    finally:
        for proc in (sleeper, watchdog):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
