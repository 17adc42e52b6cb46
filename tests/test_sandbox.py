"""Model code as an adversary: each escape that worked against the old runner, contained.

Each test runs hostile code through the public ``code_execution`` reward and checks, from
outside, that it was contained: the test process and a victim survive, no file appears
outside the sandbox, a listener gets no connection, the reward is not forged, and no
process of the sample (found by a marker process name) is left running afterwards.
"""

import contextlib
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import grpo.rewards._sandboxed as _sandboxed
import grpo.rewards.sandbox as sandbox_module
from grpo.rewards.code import (
    DEFAULT_FILE_BYTES,
    DEFAULT_PROCESSES,
    DEFAULT_TMP_BYTES,
    make_code_execution,
)
from grpo.rewards.sandbox import SandboxUnavailable, sandbox


@pytest.fixture(scope="module", autouse=True)
def isolation():
    """The sandbox, or a skip saying why this machine cannot isolate code."""
    try:
        return sandbox("bwrap")
    except SandboxUnavailable as error:
        pytest.skip(f"needs bubblewrap and user namespaces: {error}")


def score(code, tests, timeout=5.0, memory_bytes=1 << 30):
    reward = make_code_execution(timeout=timeout, memory_bytes=memory_bytes)
    completion = f"```python\n{textwrap.dedent(code)}\n```"
    return reward(prompts=["q"], completions=[completion], tests=[tests])[0]


def marker():
    """A process name (15 characters, the kernel's limit) no other process has."""
    return "grpo-" + secrets.token_hex(5)


@contextlib.contextmanager
def watching(name):
    """The most processes named ``name`` seen at once while the block ran (a list of one)."""
    most, done = [0], threading.Event()

    def watch():
        while not done.wait(0.02):
            most[0] = max(most[0], len(running(name)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield most
    finally:
        done.set()
        watcher.join()


def running(name):
    """Host PIDs of processes named ``name``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == name:
                pids.append(int(entry.name))
        except OSError:  # ended meanwhile
            pass
    return pids


# ---- signals ---------------------------------------------------------------------------


def test_cannot_signal_the_trainer():
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(True))
    code = f"""
        import os, signal
        for pid in (os.getppid(), 1):  # the old runner's parent was the trainer
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.kill({os.getpid()}, signal.SIGUSR1)  # the trainer's own PID
        except OSError:
            pass
        reached = True
    """
    try:
        assert score(code, ["assert reached"]) == 1.0  # the program ran all of it
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == []


def test_cannot_kill_another_process_of_the_same_user():
    victim = subprocess.Popen(["sleep", "60"])
    code = f"""
        import os, signal
        for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP):
            try:
                os.kill({victim.pid}, sig)
            except OSError:
                pass
        reached = True
    """
    try:
        assert score(code, ["assert reached"]) == 1.0
        assert victim.poll() is None  # still running
    finally:
        victim.kill()
        victim.wait()


# ---- nothing left running ----------------------------------------------------------------

DAEMON = """\
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open('/proc/self/comm', 'w').write({name!r})
        open('started', 'w').close()
        time.sleep(30)
        open({escape!r}, 'w').write('still running')
    os._exit(0)
def started():
    for _ in range(500):
        if os.path.exists('started'):
            return True
        time.sleep(0.01)
    return False
"""


def test_daemon_does_not_outlive_its_sample(tmp_path):
    name = marker()
    code = DAEMON.format(name=name, escape=str(tmp_path / "late.txt"))
    assert score(code, ["assert started()"]) == 1.0  # double fork + setsid happened
    assert running(name) == []


def test_daemon_does_not_outlive_the_timeout(tmp_path):
    name = marker()
    code = DAEMON.format(name=name, escape=str(tmp_path / "late.txt"))
    code += "started()\nwhile True:\n    pass\n"
    with watching(name) as seen:
        assert score(code, ["assert started()"], timeout=1.0) == 0.0  # timed out
    assert seen == [1]  # the daemon ran
    assert running(name) == []


# ---- the pass count ---------------------------------------------------------------------

WRONG_SQUARE = "def square(x):\n    return 0\n"
SQUARE_TESTS = "assert square(2) == 4\nassert square(3) == 9"


@pytest.mark.parametrize(
    "forgery",
    [
        # The old runner's count lived in __main__, and in frames above the program.
        """
        import __main__, gc, sys
        __main__.passed = 10**6
        frame = sys._getframe().f_back
        while frame is not None:
            if 'passed' in frame.f_globals:
                frame.f_globals['passed'] = 10**6
            frame = frame.f_back
        for obj in gc.get_objects():
            if type(obj) is dict and type(obj.get('passed')) is int:
                obj['passed'] = 10**6
        """,
        # An answer equal to anything.
        """
        class Anything:
            def __eq__(self, other):
                return True
            def __ne__(self, other):
                return False
            def __bool__(self):
                return True
        def square(x):
            return Anything()
        """,
        # A full-marks result written on every descriptor, then a clean exit.
        """
        import json, os
        for fd in range(64):
            for line in (b'ready\\n2\\n', b'2\\n', json.dumps(['ok', True]).encode() + b'\\n'):
                try:
                    os.write(fd, line)
                except OSError:
                    pass
        os._exit(0)
        """,
        # Builtins and modules the tests use, rewritten by the program.
        """
        import math
        math.isclose = lambda *args, **kwargs: True
        abs = lambda value: 0
        """,
    ],
    ids=["runner-variables", "always-equal", "result-on-every-fd", "shadow-abs-and-math"],
)
def test_pass_count_cannot_be_forged(forgery):
    tests = [*SQUARE_TESTS.splitlines(), "assert abs(square(2) - 4) < 1e-9"]
    tests += ["assert math.isclose(square(3), 9)"]  # math: the tests do not import it
    assert score(WRONG_SQUARE + textwrap.dedent(forgery), tests) == 0.0


# ---- the trainer's environment and files --------------------------------------------------


def test_cannot_read_the_trainer_environment(monkeypatch):
    # /proc/PID/environ shows the environment a process started with: this process's
    started_with = Path("/proc/self/environ").read_bytes().split(b"\0")
    needle = max(started_with, key=len).decode(errors="replace")
    if not needle:
        pytest.skip("this test process started with an empty environment")
    secret = secrets.token_hex(8)
    monkeypatch.setenv("GRPO_TEST_SECRET", secret)
    code = f"""
        import os
        seen = repr(dict(os.environ))
        for pid in (os.getppid(), 1, {os.getpid()}):
            try:
                seen += open(f'/proc/{{pid}}/environ', 'rb').read().decode(errors='replace')
            except OSError:
                pass
        tried = True
    """
    # the last test shows the program ran; the others fail unless the environment leaked
    tests = [f"assert {secret!r} in seen", f"assert {needle!r} in seen", "assert tried"]
    assert score(code, tests) == pytest.approx(1 / 3)


def test_cannot_read_or_write_the_trainer_directory(tmp_path, monkeypatch):
    secret = secrets.token_hex(8)
    (tmp_path / "secret.txt").write_text(secret)
    monkeypatch.chdir(tmp_path)
    code = f"""
        import os
        seen = ''
        for root in [f'/proc/{{pid}}/cwd' for pid in (os.getppid(), 1, {os.getpid()})]:
            for path in (root + '/secret.txt', {str(tmp_path / "secret.txt")!r}):
                try:
                    seen += open(path).read()
                except OSError:
                    pass
            try:
                open(root + '/planted.txt', 'w').write('x')
            except OSError:
                pass
        tried = True
    """
    assert score(code, [f"assert {secret!r} in seen", "assert tried"]) == 0.5
    assert sorted(os.listdir(tmp_path)) == ["secret.txt"]


def test_writes_stay_inside_the_sandbox(tmp_path):
    escapes = [tmp_path / "escaped.txt", Path("/tmp") / f"grpo-escape-{secrets.token_hex(4)}"]
    code = f"""
        for path in {[str(p) for p in escapes]!r} + ['/usr/grpo-escape', '/opt/grpo/x']:
            try:
                open(path, 'w').write('x')
            except OSError:
                pass
        open('inside.txt', 'w').write('x')
        def inside():
            return open('inside.txt').read()
    """
    assert score(code, ["assert inside() == 'x'"]) == 1.0
    assert [p for p in [*escapes, Path("/usr/grpo-escape")] if p.exists()] == []


def test_cannot_change_host_settings():
    # Checked with access(2), never written: uid 0 without capabilities (a root trainer's
    # sandbox without the drop to nobody) may write these host-wide files.
    code = """
        import os
        paths = ['/proc/sys/kernel/core_pattern', '/proc/sys/vm/overcommit_memory',
                 '/proc/sys/vm/drop_caches', '/proc/sysrq-trigger', '/usr/bin', '/', '/dev']
        writable = [path for path in paths if os.access(path, os.W_OK)]
        checked = True
    """
    assert score(code, ["assert writable == []", "assert checked"]) == 1.0


# ---- network ----------------------------------------------------------------------------


def test_cannot_reach_a_listener_on_localhost():
    abstract = f"\0grpo-{secrets.token_hex(4)}"
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix,
    ):
        tcp.bind(("127.0.0.1", 0))
        unix.bind(abstract)
        for listener in (tcp, unix):
            listener.listen(1)
            listener.setblocking(False)
        code = f"""
            import socket
            reached = []
            for family, address in [(socket.AF_INET, ('127.0.0.1', {tcp.getsockname()[1]})),
                                    (socket.AF_UNIX, {abstract!r})]:
                try:
                    with socket.socket(family, socket.SOCK_STREAM) as s:
                        s.settimeout(1)
                        s.connect(address)
                        s.sendall(b'hello')
                        reached.append(family)
                except OSError:
                    pass
            tried = True
        """
        assert score(code, ["assert reached", "assert tried"]) == 0.5
        for listener in (tcp, unix):
            with pytest.raises(BlockingIOError):  # no connection is waiting
                listener.accept()


# ---- resource bombs ---------------------------------------------------------------------


def test_fork_bomb_is_bounded():
    name = marker()
    code = f"""
        import os, time
        open('/proc/self/comm', 'w').write({name!r})
        forks = 0
        while forks < 10_000:
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                while True:  # every child forks too
                    try:
                        os.fork()
                    except OSError:
                        time.sleep(0.01)
            forks += 1
    """
    assert score(code, [f"assert 0 < forks < {DEFAULT_PROCESSES}"]) == 1.0
    assert running(name) == []


def test_memory_bomb_across_processes_is_bounded(isolation):
    limit, chunk, children = 256 << 20, 64 << 20, 6
    code = f"""
        import os, time
        holders = []
        for _ in range({children}):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                with open('/proc/self/oom_score_adj', 'w') as f:  # the OOM killer's first pick
                    f.write('1000')
                try:
                    block = b'x' * {chunk}  # written, so resident
                    os.write(write, b'1')
                except MemoryError:
                    os.write(write, b'0')
                time.sleep(60)
            os.close(write)
            holders.append((pid, read))
        # each child reports once it holds its block, or is killed before it can; only
        # when all have, no allocation is left to make the OOM killer take another
        reported = [os.read(read, 1) == b'1' for _, read in holders]
        time.sleep(0.2)  # a victim's exit lands
        holding = sum(
            ok and os.waitpid(pid, os.WNOHANG) == (0, 0)
            for (pid, _), ok in zip(holders, reported)
        )
    """
    # a cgroup bounds all processes together; without one, each process is bounded. Which
    # process the OOM killer takes is the kernel's choice, so how many hold is not asserted
    # from below: unbounded, all 6 would hold 384 MiB and the test fails.
    bound = limit if isolation.cgroups is not None else limit * DEFAULT_PROCESSES
    tests = [f"assert holding * {chunk} <= {bound}"]
    # generous time: under load, reclaim and the OOM kills take seconds
    assert score(code, tests, timeout=30.0, memory_bytes=limit) == 1.0


def test_file_size_bomb_is_bounded():
    code = """
        import os, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails instead of killing
        def fill(path, size):
            with open(path, 'wb', buffering=0) as f:
                for _ in range(size >> 20):
                    try:
                        f.write(b'x' * (1 << 20))
                    except OSError:
                        break
            return os.path.getsize(path)
        big = fill('big', 64 << 20)
        total = sum(fill(f'part{i}', 15 << 20) for i in range(8))
    """
    tests = [
        f"assert 0 < big <= {DEFAULT_FILE_BYTES}",  # one file: RLIMIT_FSIZE
        f"assert 0 < total <= {DEFAULT_TMP_BYTES}",  # many files: the private /tmp's size
    ]
    assert score(code, tests) == 1.0


def test_cpu_burners_end_with_the_timeout():
    name = marker()
    code = f"""
        import os, signal
        for _ in range(3):
            if os.fork() == 0:
                os.setsid()
                for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGXCPU, signal.SIGINT):
                    signal.signal(sig, signal.SIG_IGN)
                open('/proc/self/comm', 'w').write({name!r})
                while True:
                    pass
        while True:
            pass
    """
    with watching(name) as seen:
        assert score(code, ["assert True"], timeout=1.0) == 0.0  # timed out
    assert seen == [3]  # all three burners ran
    assert running(name) == []


# ---- failing closed ---------------------------------------------------------------------


def test_fails_closed_without_bubblewrap(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    reward = make_code_execution()
    with pytest.raises(SandboxUnavailable, match=r"bubblewrap.*isolation='none'") as error:
        reward(prompts=["q"], completions=[WRONG_SQUARE], tests=[SQUARE_TESTS])
    assert "\n" not in str(error.value)


def test_unknown_isolation_is_refused():
    with pytest.raises(ValueError, match="isolation='docker'; expected one of"):
        make_code_execution(isolation="docker")


def test_fails_closed_without_user_namespaces():
    # The check runs in a bwrap sandbox that forbids creating user namespaces, as some
    # containers do; sandbox.py is stdlib only, so it is loaded by path, without torch.
    path = Path(sandbox_module.__file__)
    check = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('sandbox', {str(path)!r})\n"
        "module = sys.modules['sandbox'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "try:\n"
        "    module.sandbox('bwrap')\n"
        "except module.SandboxUnavailable as error:\n"
        "    print(error)\n"
    )
    command = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    # /tmp stays the host's: the interpreter and this checkout may live there (a CI clone)
    command += ["--bind", "/tmp", "/tmp", "--unshare-user", "--unshare-pid", "--disable-userns"]
    result = subprocess.run(
        [*command, "--", sys.executable, "-I", "-c", check], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert message.startswith("code_execution: cannot isolate model code: ")
    assert "isolation='none'" in message
    assert "\n" not in message


# ---- values on the wire -------------------------------------------------------------------


def test_values_cross_as_plain_literals():
    value = [None, True, -(10**5000), 0.1, float("inf"), 1 - 2j, "é", b"\0", (1,), {2}]
    value += [frozenset({3}), {"k": [4]}]
    wire = json.loads(json.dumps(_sandboxed.encode(value, repr)))
    assert _sandboxed.decode(wire, None) == value
    assert math.isnan(_sandboxed.decode(_sandboxed.encode(float("nan"), repr), None))
    with pytest.raises(ValueError, match="not an encoded value"):
        _sandboxed.decode(3, None)  # a bare number is not what encode writes
    with pytest.raises(ValueError, match="expected a string"):
        _sandboxed.decode({"i": 3}, None)
    with pytest.raises(ValueError, match="nested deeper"):
        _sandboxed.decode([[[]]], None, depth=_sandboxed.MAX_DEPTH - 1)


def test_objects_that_are_not_literals_become_handles():
    class Anything:
        def __eq__(self, other):
            return True

    kept = []
    wire = _sandboxed.encode((Anything(), [1]), lambda obj: kept.append(obj) or {"h": 0})
    assert wire == {"t": [{"h": 0}, [{"i": "0x1"}]]}
    assert _sandboxed.decode(wire, lambda handle: ("handle", handle)) == (("handle", 0), [1])
