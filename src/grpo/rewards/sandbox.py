"""Isolation for model-written code: bubblewrap namespaces, plus a cgroup where one can be made.

Every sandboxed process is started by ``bwrap`` (bubblewrap, the sandbox Flatpak uses) with:

- its own PID, network, IPC, UTS and cgroup namespaces, no capabilities, no_new_privs: it
  sees and can signal only its own processes (the trainer is not in its PID namespace),
  and its network is a loopback of its own. Who it runs as: an ordinary user's sandbox
  gets a user namespace of its own that may not create more; a root trainer's sandbox
  runs as nobody (uid 65534, dropped by ``setpriv`` once bwrap has built the namespaces),
  because uid 0 without capabilities may still write root-owned files such as
  ``/proc/sys/kernel/core_pattern``;
- its own root: read-only binds of /usr, the /bin and /lib links and the Python
  installation, a fresh /proc of its own PID namespace, a minimal read-only /dev, and two
  size-bounded tmpfs, /dev/shm and /tmp (the working directory), the only places it can
  write. Nothing else of the host exists in it: no /home, /etc, /run, no trainer
  directory, and an empty environment;
- its own session, and death with the trainer. The sandbox's PID 1 is killed when the
  sample ends; the kernel then kills every process left in its PID namespace (double
  forks and ``setsid`` included) before the sandbox counts as ended.

Limits: CPU seconds, file size and (per process) address space are rlimits set before any
model code runs. Memory and process count of all the program's processes together are
bounded by a cgroup (v1 ``memory`` + ``pids``, or v2 with both controllers delegated) when
this process may create one, which root usually may; otherwise by ``RLIMIT_AS`` per process
and ``RLIMIT_NPROC`` (which counts per user namespace for an ordinary user's sandbox), so
total memory is bounded only by their product. ``Sandbox.describe()`` says which. No
seccomp filter is installed: the kernel's system calls are all reachable.

Fail closed: if ``bwrap`` is missing or cannot create the namespaces (a container without
user namespaces, for example), ``sandbox("bwrap")`` raises ``SandboxUnavailable`` saying why.
``sandbox("none")`` runs the same processes without any isolation; it is unsafe with a
policy that may write hostile code, and exists for machines where isolation is impossible.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ISOLATIONS = ("bwrap", "none")
"""``bwrap``: namespaces (fails closed); ``none``: plain subprocesses, UNSAFE with hostile code."""
SCRIPT = Path(__file__).with_name("_sandboxed.py")
BASE_PYTHON = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
"""The interpreter under ``sys.base_prefix`` that a virtual environment was made from."""
_SCRIPT_INSIDE = "/opt/grpo/sandboxed.py"
NOBODY = 65534
"""The uid and gid sandboxes run as when the trainer is root."""
_SHM_BYTES = 8 << 20
"""Size of the sandbox's /dev/shm (POSIX shared memory, semaphores)."""
_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Moves the shell into each cgroup given, then becomes the sandbox: nothing runs outside it.
_ENTER_CGROUPS = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; '
    'exec "$@"'
)


_REQUIRED = ("memory.limit_in_bytes", "memory.max", "pids.max")


class SandboxUnavailable(RuntimeError):
    """Model code cannot be isolated on this machine; the message says why and what to do."""


@dataclass(frozen=True)
class Limits:
    """What one sandboxed program (all of its processes) may use."""

    memory_bytes: int
    """Memory of all processes together (cgroup), and address space of each (RLIMIT_AS)."""
    cpu_seconds: int
    """CPU seconds of each process (RLIMIT_CPU); the caller's wall-clock timeout bounds all."""
    file_bytes: int
    """Largest file a process may write (RLIMIT_FSIZE)."""
    processes: int
    """Processes and threads (cgroup pids.max, and RLIMIT_NPROC)."""
    tmp_bytes: int
    """Size of the private /tmp, the working directory."""

    def rlimits(self, count_processes: bool) -> dict[str, int]:
        """The limits ``_sandboxed.set_limits`` applies inside.

        ``count_processes``: set RLIMIT_NPROC too (-1: unlimited). Not under a cgroup's
        pids limit: for nobody it would count every sample's processes together.
        """
        return {
            "memory": self.memory_bytes,
            "cpu": self.cpu_seconds,
            "fsize": self.file_bytes,
            "nproc": self.processes if count_processes else -1,
        }


@dataclass(frozen=True)
class _Cgroups:
    """Directories under which this process may create cgroups, and the files to limit."""

    version: int
    parents: tuple[tuple[Path, tuple[str, ...]], ...]

    def create(self, limits: Limits) -> list[Path]:
        values = {
            "memory.limit_in_bytes": limits.memory_bytes,
            "memory.memsw.limit_in_bytes": limits.memory_bytes,  # no escape into swap
            "memory.max": limits.memory_bytes,
            "memory.swap.max": 0,
            "pids.max": limits.processes,
        }
        made: list[Path] = []
        try:
            for parent, files in self.parents:
                made.append(parent / f"grpo-sandbox-{secrets.token_hex(8)}")
                made[-1].mkdir()
                for name in files:
                    if name in _REQUIRED or (made[-1] / name).exists():
                        (made[-1] / name).write_text(str(values[name]))
        except OSError:
            _remove_cgroups(made)
            raise
        return made


def _remove_cgroups(groups: list[Path]) -> None:
    """Kill whatever is still in ``groups`` (only sandboxed processes are), then remove them."""
    for group in groups:
        for _ in range(200):
            with contextlib.suppress(OSError):
                pids = (group / "cgroup.procs").read_text().split()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                group.rmdir()
                break
            time.sleep(0.01)


def _find_cgroups() -> _Cgroups | None:
    """The cgroup hierarchies where memory and pids limits can be set, or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    own = {c: p for _, cs, p in (line.split(":", 2) for line in lines) for c in cs.split(",")}
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists() and "" in own:
        parent = root / own[""].lstrip("/")
        try:
            delegated = (parent / "cgroup.subtree_control").read_text().split()
        except OSError:
            return None
        if not {"memory", "pids"} <= set(delegated):
            return None
        found = _Cgroups(2, ((parent, ("memory.max", "memory.swap.max", "pids.max")),))
    elif "memory" in own and "pids" in own:
        parents = []
        for controller, files in [
            ("memory", ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")),
            ("pids", ("pids.max",)),
        ]:
            parent = root / controller / own[controller].lstrip("/")
            parents.append((parent if parent.is_dir() else root / controller, files))
        found = _Cgroups(1, tuple(parents))
    else:
        return None
    try:  # only trying tells whether this process may
        _remove_cgroups(found.create(Limits(1 << 30, 1, 1, 64, 1)))
    except OSError:
        return None
    return found


@dataclass(frozen=True)
class Sandbox:
    """Starts programs isolated by bubblewrap (``bwrap`` set) or, unsafely, as plain processes."""

    bwrap: str | None
    options: tuple[str, ...]
    """Optional bwrap flags this version has (``--disable-userns``, ``--size``)."""
    cgroups: _Cgroups | None
    user: int | None = None
    """The uid and gid sandboxes run as when this process is root (nobody), else None."""
    setpriv: str | None = None
    """util-linux ``setpriv``, which drops to ``user`` inside, once bwrap built the sandbox."""

    def describe(self) -> str:
        """One line: the isolation and how memory and processes are bounded."""
        if self.bwrap is None:
            return "none (UNSAFE: model code runs as this user, with its files and network)"
        if self.cgroups is not None:
            bound = f"cgroup v{self.cgroups.version} (all processes of a sample together)"
        else:
            bound = "RLIMIT_AS per process and RLIMIT_NPROC (no cgroup could be created)"
        who = f", as uid {self.user}" if self.user is not None else ""
        return f"bubblewrap ({self.bwrap}{who}); memory and processes: {bound}"

    def python(self) -> list[str]:
        """The command that runs ``_sandboxed.py`` in this sandbox: the base interpreter
        (a virtual environment's may live anywhere, e.g. under /tmp, which the sandbox
        replaces; the script needs the standard library only)."""
        if not self.bwrap:
            return [sys.executable, "-I", str(SCRIPT)]
        return [BASE_PYTHON, "-I", _SCRIPT_INSIDE]

    @contextlib.contextmanager
    def run(
        self, argv: list[str], limits: Limits, *, confine: bool, cwd: Path, **popen: Any
    ) -> Iterator[subprocess.Popen]:
        """Start ``argv`` (in a cgroup if ``confine`` and one can be made); kill all on exit.

        ``cwd`` is the working directory when unisolated; bwrap uses its private /tmp.
        """
        groups = self.cgroups.create(limits) if confine and self.cgroups is not None else []
        with contextlib.ExitStack() as cleanup:  # runs last-in first-out
            cleanup.callback(_remove_cgroups, groups)
            fds: list[int] = []
            cleanup.callback(_close_all, fds)
            info_read, info_write = os.pipe() if self.bwrap else (-1, -1)
            fds += [info_read, info_write] if self.bwrap else []
            command = self._command(argv, limits, info_write)
            if groups:
                procs = [str(group / "cgroup.procs") for group in groups]
                command = ["/bin/sh", "-c", _ENTER_CGROUPS, "sh", str(len(procs)), *procs, *command]
            process = subprocess.Popen(
                command,
                cwd="/" if self.bwrap else cwd,
                env={},
                start_new_session=True,
                pass_fds=(*popen.pop("pass_fds", ()), *([info_write] if self.bwrap else [])),
                **popen,
            )
            inner = _Inner(process)
            cleanup.callback(inner.close)
            if self.bwrap:
                os.close(fds.pop())  # only bwrap holds the info-fd now: it ends when bwrap does
                inner.pidfd = _read_child_pidfd(info_read)
            yield process

    def _command(self, argv: list[str], limits: Limits, info_fd: int) -> list[str]:
        if self.bwrap is None:
            return argv
        args = [self.bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
        args += ["--unshare-cgroup-try", "--cap-drop", "ALL"]
        if self.user is None:  # an ordinary user: a user namespace of its own, no capabilities
            args += ["--unshare-user"]
            args += ["--disable-userns"] if "--disable-userns" in self.options else []
        else:
            # Root: uid 0 without capabilities could still write root-owned files such as
            # /proc/sys/kernel/core_pattern, so the program runs as nobody (setpriv, after
            # bwrap built the namespaces), with all capabilities and their bounding set gone.
            args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
            args += ["--cap-add", "CAP_SETPCAP"]
            uid = str(self.user)
            argv = [self.setpriv or "setpriv", "--reuid", uid, "--regid", uid, "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all", "--", *argv]  # fmt: skip
        args += ["--die-with-parent", "--new-session", "--clearenv", "--info-fd", str(info_fd)]
        args += ["--proc", "/proc", "--dev", "/dev", "--ro-bind", "/usr", "/usr"]
        for path in _SYSTEM_DIRS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        # The only writable places, each a size-bounded tmpfs; / and /dev are read-only, so
        # they are no unbounded RAM disk either. Mounted before the binds, so a bind below
        # /tmp (an interpreter installed there) stays visible.
        for tmpfs, size in [("/tmp", limits.tmp_bytes), ("/dev/shm", _SHM_BYTES)]:
            args += ["--size", str(size)] if "--size" in self.options else []
            args += ["--perms", "1777", "--tmpfs", tmpfs]
        prefix = sys.base_prefix
        binds = [] if prefix == "/usr" or prefix.startswith("/usr/") else [(prefix, prefix)]
        for source, target in [*binds, (str(SCRIPT), _SCRIPT_INSIDE)]:
            for parent in reversed(Path(target).parents[:-1]):  # bwrap would copy 0700 /root
                args += ["--perms", "0755", "--dir", str(parent)]
            args += ["--ro-bind", source, target]
        args += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp"]
        return [*args, "--", *argv]


def _close_all(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


class _Inner:
    """The sandbox's PID 1 as a pidfd (from bwrap's --info-fd), to end everything at once."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.pidfd = -1

    def close(self) -> None:
        """Kill the namespace's PID 1 (the kernel then kills the rest), then bwrap."""
        if self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            os.close(self.pidfd)
            # bwrap reaps PID 1, and exits, only after the kernel emptied the namespace
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # unisolated: the session's group
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def _read_child_pidfd(info_fd: int) -> int:
    """A pidfd for the ``child-pid`` bwrap reports, or -1 if it ended before reporting."""
    data = b""
    while True:
        ready, _, _ = select.select([info_fd], [], [], 30.0)
        chunk = os.read(info_fd, 4096) if ready else b""
        data += chunk
        with contextlib.suppress(ValueError, KeyError, TypeError):
            pid = int(json.loads(data)["child-pid"])
            try:
                return os.pidfd_open(pid)
            except ProcessLookupError:
                return -1
        if not chunk:
            return -1


@functools.cache
def _bubblewrap(path: str | None) -> Sandbox:
    if path is None:
        raise SandboxUnavailable(
            "code_execution: cannot isolate model code: bubblewrap (bwrap) is not on PATH; "
            "install it (apt-get install bubblewrap), or pass isolation='none' to "
            "make_code_execution to run model code UNSAFELY without isolation"
        )
    usage = subprocess.run([path, "--help"], capture_output=True, text=True).stdout
    options = tuple(flag for flag in ("--disable-userns", "--size") if flag in usage)
    user, setpriv = (NOBODY, shutil.which("setpriv")) if os.geteuid() == 0 else (None, None)
    if user is not None and setpriv is None:
        raise SandboxUnavailable(
            "code_execution: cannot isolate model code as root: setpriv (util-linux) is not "
            "on PATH to run it as nobody; install util-linux, or pass isolation='none' to "
            "make_code_execution to run model code UNSAFELY without isolation"
        )
    candidate = Sandbox(path, options, None, user, setpriv)
    limits = Limits(256 << 20, 5, 1 << 20, 16, 1 << 20)
    with open(os.devnull, "rb") as stdin, tempfile.TemporaryFile() as err:
        python = [*candidate.python()[:2], "-c", "pass"]
        with candidate.run(
            python, limits, confine=False, cwd=Path("/"), stdin=stdin, stdout=err, stderr=err
        ) as process:
            process.wait()
        err.seek(0)
        why = err.read().decode(errors="replace").strip().splitlines() or ["no message"]
    if process.returncode != 0:
        fix = (
            "allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
            "user.max_user_namespaces > 0) or run where they are allowed"
            if "namespace" in why[-1]
            else "Python must run from /usr or its own prefix"
        )
        raise SandboxUnavailable(
            f"code_execution: cannot isolate model code: {path} failed with {why[-1]!r}; "
            f"{fix}, or pass isolation='none' to make_code_execution to run model code "
            "UNSAFELY without isolation"
        )
    return Sandbox(path, options, _find_cgroups(), user, setpriv)


def sandbox(isolation: str = "bwrap") -> Sandbox:
    """The sandbox for ``isolation`` (see ``ISOLATIONS``), checked once by running it.

    Raises ``SandboxUnavailable`` (one line: why, and what to do) if bwrap is missing or
    cannot create its namespaces here.
    """
    if isolation == "none":
        return Sandbox(None, (), None)
    if isolation != "bwrap":
        raise ValueError(f"isolation={isolation!r}; expected one of {ISOLATIONS}")
    return _bubblewrap(shutil.which("bwrap"))
