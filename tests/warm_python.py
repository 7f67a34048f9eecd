"""Warm starts for the tests' command lines: the suite's subprocesses without the import.

About half of the suite's CPU time was Python processes importing torch, Lightning and the
model libraries (3-5 s each, 10+ s on a slow host) before doing a second of work: the command
lines the tests run (`python train.py fit ...`, `python -m lightning_mia.cli ...`), the stages an
experiment starts, the ranks Lightning re-launches under `ddp` and the workers multiprocessing
spawns under `ddp_spawn`. Here one server process imports those libraries once and, for each
such command, forks a child that becomes it (`tests/warm_child.py`):

- the child takes the caller's argv, environment, working folder and every open file descriptor
  (stdin/stdout/stderr, pipes passed with `pass_fds`), runs the script or module as
  `__main__` exactly as `python` would (`runpy`), and ends as a Python process ends (atexit,
  threads joined, an uncaught exception printed with exit code 1) but for the teardown of
  every module, which a forked child would pay for what the server imported;
- the caller is a small launcher (`python -IS`, standard library only) standing where
  `sys.executable` points in the tests: it forwards the signals it gets to the child and exits
  with the child's status (or dies of the child's signal). If it is killed (SIGKILL), the server
  kills the child's process group.

Anything else runs cold (the launcher `exec`s the real interpreter): another module or option
(`-c`, `-m pip`), or an environment that differs from the server's in what libraries read when
they are imported (`PYTHON*`, `HF_*`, `ATEN_*`, ...). `LIGHTNING_MIA_TEST_COLD=1` runs every
command cold; tests that check what a fresh interpreter prints use `COLD_PYTHON`.
"""

from __future__ import annotations

import array
import json
import os
import re
import selectors
import signal
import socket
import struct
import sys
from pathlib import Path

COLD_PYTHON = os.environ.get("LIGHTNING_MIA_TEST_REAL_PYTHON") or sys.executable
ROOT = Path(__file__).resolve().parents[1]
# what a command may be to start warm: a module of the package, torchrun, or a script of the repo
WARM_MODULES = ("lightning_mia", "torch.distributed.run")
# environment variables that libraries read when they are imported: a command whose value of
# one differs from the server's starts cold
IMPORT_TIME_ENV = ("PYTHON", "HF_", "HUGGINGFACE", "TRANSFORMERS", "DIFFUSERS", "ATEN_", "LD_")
IMPORT_TIME_ENV += ("TORCH_LOGS", "TORCHDYNAMO", "TORCHINDUCTOR", "GOMP_", "MALLOC")
PRELOAD = (
    "lightning_mia.cli",
    "lightning_mia.experiment",
    "lightning_mia.attack.command",
    "lightning_mia.models.diffusion",
    "lightning_mia.models.flow",
    "lightning_mia.models.seq2seq",
    "lightning_mia.models.autoencoder",
    "lightning_mia.models.encoder",
    "torch.distributed.run",
)
# multiprocessing.spawn.get_command_line (-B: PYTHONDONTWRITEBYTECODE, the server's own value)
SPAWN = re.compile(
    r"(-B\0)?-c\0from multiprocessing\.spawn import spawn_main; "
    r"spawn_main\(tracker_fd=\d+, pipe_handle=\d+\)\0--multiprocessing-fork"
)
HEADER = struct.Struct("!I")
MAX_FDS = 250  # SCM_RIGHTS carries at most 253 descriptors in one message (`_send`)


# --- the command's side (the launcher) ----------------------------------------------------------
def command(args: list[str]) -> tuple[str, str, list[str]] | None:
    """(`-m`, the script or "spawn"; its module, path or code; its arguments) of a
    warm-startable command line, or None: `[-u] (-m <module> | <script.py>) args...`, or a
    worker that multiprocessing's spawn starts (Lightning's `ddp_spawn` ranks)."""
    if SPAWN.fullmatch("\0".join(args)):
        return "spawn", args[-2], args[-1:]
    rest = args[1:] if args[:1] == ["-u"] else args
    if len(rest) >= 2 and rest[0] == "-m" and rest[1].startswith(WARM_MODULES):
        return "-m", rest[1], rest[2:]
    if rest and rest[0].endswith(".py") and not rest[0].startswith("-"):
        script = Path(rest[0]).resolve()
        if script.is_file() and ROOT in script.parents and "tests" not in script.parts:
            return "script", rest[0], rest[1:]
    return None


def _send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    """One message and its descriptors, MAX_FDS per sendmsg (a ddp_spawn rank inherits one
    per shared tensor: hundreds): each further batch rides on one byte of JSON whitespace."""
    data = json.dumps(message).encode()
    batches = [fds[i : i + MAX_FDS] for i in range(0, len(fds), MAX_FDS)] or [[]]
    head = HEADER.pack(len(data) + len(batches) - 1) + data
    for i, batch in enumerate(batches):
        sock.sendmsg([head if i == 0 else b" "], [_rights(batch)] if batch else [])


def _rights(fds: list[int]) -> tuple:
    return (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))


def _receive(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """One message and the descriptors sent with it; (None, []) at end of stream."""
    data, fds = b"", []
    while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack(data[:4])[0]:
        chunk, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
        if not chunk:
            return None, fds
        data += chunk
    return json.loads(data[HEADER.size :]), fds


def _open_fds(skip: int) -> list[int]:
    fds = [int(name) for name in os.listdir("/proc/self/fd") if int(name) != skip]
    return sorted(fd for fd in fds if os.path.lexists(f"/proc/self/fd/{fd}"))


def _forward(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:  # it has ended: its status is on its way
        pass


def launch(real: str, path: str) -> None:
    """Run `sys.argv[1:]` as `python` would: warm through the server at `path` when it can."""
    args = sys.argv[1:]
    cold = command(args) is None or os.environ.get("LIGHTNING_MIA_TEST_COLD") == "1"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if cold:
            raise OSError
        sock.connect(path)
        fds = _open_fds(sock.fileno())
        _send(sock, {"argv": args, "env": dict(os.environ), "cwd": os.getcwd(), "fds": fds}, fds)
        reply, _ = _receive(sock)
    except OSError:
        reply = None
    if not reply or "pid" not in reply:  # no server, or it says cold
        sock.close()
        os.execv(real, [real, *args])
    pid = reply["pid"]
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda s, _frame: _forward(pid, s))
    status, _ = _receive(sock)
    if status is None:
        print(f"warm_python: the server ended before {args} did", file=sys.stderr)
        os._exit(1)
    if status["signal"]:
        signal.signal(status["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), status["signal"])
    os._exit(status["code"])


def write_launcher(folder: Path, socket_path: str) -> Path:
    """An executable that stands for `python` in the tests (what `sys.executable` points at)."""
    launcher = folder / "python"
    launcher.write_text(
        f"#!{COLD_PYTHON} -IS\n"
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        f"from warm_python import launch\nlaunch({COLD_PYTHON!r}, {socket_path!r})\n"
    )
    launcher.chmod(0o755)
    return launcher


# --- the server's side ------------------------------------------------------------------------
def cold_reason(request: dict, env: dict[str, str], set_by_imports: set[str] = frozenset()) -> str:
    """Why a command cannot start in a child of this server ("" when it can): `env` is the
    server's, after its imports set `set_by_imports` (which a fresh process's imports set too)."""
    if command(request["argv"]) is None:
        return "not a command of the package"
    from lightning_mia.terminal import QUIET_ENV  # applied to imported libraries at run time

    asked = request["env"]
    for name in sorted(set(asked) | set(env)):
        read_at_import = name.startswith(IMPORT_TIME_ENV) or (
            name.startswith("OMP_") and name != "OMP_NUM_THREADS"
        )
        if name in QUIET_ENV or (name in set_by_imports and name not in asked):
            continue
        if read_at_import and asked.get(name) != env.get(name):
            return f"{name} differs"
    return ""


class Server:
    """Accepts commands on a Unix socket and forks a child for each; see the module docstring."""

    def __init__(self, path: str, env_before_imports: dict[str, str]) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        self.wake_r, wake_w = os.pipe()
        for fd in (self.wake_r, wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.env = dict(os.environ)
        self.set_by_imports = set(self.env) - set(env_before_imports)
        self.parent, self.pid = os.getppid(), os.getpid()
        self.running: dict[int, socket.socket | None] = {}  # child pid -> its launcher
        self.pid_of: dict[socket.socket, int] = {}

    def serve(self) -> tuple[dict, list[int]] | None:
        """Serve until the parent is gone; in a forked child, return (its request, its fds)."""
        try:
            while os.getppid() == self.parent:
                for key, _ in self.selector.select(timeout=1.0):
                    child = self._handle(key.fileobj)
                    if child is not None:
                        return child
        finally:
            if os.getpid() == self.pid:
                for pid in self.running:
                    _kill_group(pid)
        return None

    def _handle(self, source) -> tuple[dict, list[int]] | None:
        if source is self.listener:
            conn, _ = self.listener.accept()
            self.selector.register(conn, selectors.EVENT_READ)
        elif source == self.wake_r:
            while True:
                try:
                    if not os.read(self.wake_r, 4096):
                        break
                except BlockingIOError:
                    break
            self._reap()
        elif source in self.pid_of:  # a launcher went away before its child: SIGKILLed
            if not source.recv(1):
                _kill_group(self.pid_of[source])
                self.running[self.pid_of.pop(source)] = None
                self._drop(source)
        else:
            return self._start(source)
        return None

    def _start(self, conn: socket.socket) -> tuple[dict, list[int]] | None:
        request, fds = _receive(conn)
        reason = (
            "no request" if request is None else cold_reason(request, self.env, self.set_by_imports)
        )
        if reason:
            for fd in fds:
                os.close(fd)
            if request is not None:
                print(f"cold: {reason}: {' '.join(request['argv'])[:200]}", flush=True)
                _send(conn, {"cold": reason})
            self._drop(conn)
            return None
        pid = os.fork()
        if pid == 0:
            self._close_own(conn)
            return request, fds
        for fd in fds:
            os.close(fd)
        self.running[pid] = conn
        self.pid_of[conn] = pid
        print(f"warm {pid}: {' '.join(request['argv'])[:200]}", flush=True)
        _send(conn, {"pid": pid})
        return None

    def _reap(self) -> None:
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.running.pop(pid, None)
            if conn is not None:
                sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
                code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1
                try:
                    _send(conn, {"code": code, "signal": sig})
                except OSError:
                    pass
                self.pid_of.pop(conn, None)
                self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        conn.close()

    def _close_own(self, conn: socket.socket) -> None:
        """In a child: no trace of the server (its handlers, socket, pipe, connections)."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for key in list(self.selector.get_map().values()):
            if key.fileobj not in (self.listener, self.wake_r):
                key.fileobj.close()
        self.selector.close()
        self.listener.close()
        os.close(self.wake_r)


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass


def main(path: str) -> None:
    import importlib
    import threading

    env = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    # (idle native pools, OpenBLAS's, re-create themselves in a forked child; Python threads not)
    if threading.active_count() != 1:
        print("warm_python: a Python thread after the imports: not serving", flush=True)
        return
    child = Server(path, env).serve()
    if child is not None:
        from warm_child import run_as_python

        run_as_python(*child)


# --- the test session's side ----------------------------------------------------------------------
def start_server(export: bool = True):
    """Start the server (it takes a few seconds to import; commands start cold until it
    listens); `export`: tell the test processes where its launcher is (the workers take the
    controller's environment). Returns (its process, its folder: socket, launcher, log)."""
    import subprocess
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="lightning-mia-warm-"))  # short: a socket path
    path = str(folder / "socket")
    env = {**os.environ, "LIGHTNING_MIA_TEST_LAUNCHER": str(folder / "python")}
    env["LIGHTNING_MIA_TEST_REAL_PYTHON"] = COLD_PYTHON
    if export:
        os.environ.update(env)
    write_launcher(folder, path)
    with open(folder / "server.log", "w") as log:
        proc = subprocess.Popen(
            [COLD_PYTHON, __file__, "serve", path],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return proc, folder


def stop_server(server) -> None:
    import shutil

    proc, folder = server
    proc.terminate()  # it kills the children still running
    proc.wait(timeout=60)
    if not os.environ.get("LIGHTNING_MIA_TEST_KEEP_WARM_LOG"):  # (which commands ran cold, why)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[2])
