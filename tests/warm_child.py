"""A warm start's child (`tests/warm_python.py`): it becomes the command, runs it, and ends.

It ends as `python` ends, but for the last step. Python at exit joins the threads that are not
daemons, runs the atexit functions (logging, multiprocessing's, W&B's, `weakref.finalize`),
flushes its streams, and then tears every module down, object by object. In a child forked
from a server that imported torch, Lightning, diffusers and transformers, that teardown took
about 2 s of CPU a command (`--help` warm: 2.5 s; 0.5 s without it, 2-core Xeon): the child
frees, page by page, what the server had imported, which a fresh interpreter never loaded. So
the child does the first steps itself, flushes whatever file is still open for writing (what
the teardown would have flushed as it collected the file) and C's stdio, and leaves with
`os._exit`. An uncaught exception is printed as Python prints it (the child's own frames left
out) with exit code 1; `sys.exit(x)` ends as it would; an uncaught KeyboardInterrupt ends
the process by SIGINT, as Python does. A rank whose torch.distributed process group is still
up exits whole (`end`).
"""

from __future__ import annotations

import io
import os
import signal
import sys
from typing import NoReturn

from warm_python import _open_fds, command

# what Python's teardown flushes when it collects an unclosed file: text layers first
FLUSHED = ((io.TextIOWrapper,), (io.BufferedWriter, io.BufferedRandom))


def run_as_python(request: dict, fds: list[int]) -> NoReturn:
    """Become the command (`become`), run it, and end the process as `python` would."""
    code, sig = 0, 0
    try:
        become(request, fds)
    except SystemExit as stop:
        code = exit_code(stop.code)
    except BaseException as err:  # noqa: BLE001 - as the interpreter's top level
        script = command(request["argv"])[0] == "script"
        err = err.with_traceback(_own_frames_left_out(err.__traceback__, script))
        sys.excepthook(type(err), err, err.__traceback__)
        code, sig = 1, signal.SIGINT if isinstance(err, KeyboardInterrupt) else 0
    end(code, sig)


def exit_code(value: object) -> int:
    """The status `sys.exit(value)` gives (a value neither None nor an int is printed)."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _own_frames_left_out(tb, script: bool):
    """The traceback from the command's first frame: without this module's, nor the runpy
    frames of a script (`python script.py` shows none; `python -m` shows its own)."""
    skipped = {__file__, os.path.abspath(__file__), *(["<frozen runpy>"] if script else [])}
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename in skipped:
        tb = tb.tb_next
    return tb


def end(code: int, sig: int = 0) -> NoReturn:
    """Python's exit without the module teardown: threads joined, atexit run, every file
    still open for writing flushed, C's stdio flushed; then `os._exit`. A rank whose process
    group is still up exits whole: gloo may still be sending what a peer reads (a sharded
    test's rank 1 read "Connection reset by peer" from a rank 0 that had left at once)."""
    import atexit
    import ctypes
    import gc
    import threading

    dist = sys.modules.get("torch.distributed")
    if not sig and dist is not None and dist.is_available() and dist.is_initialized():
        sys.exit(code)  # Python's whole exit: the process group's teardown waits for its sends
    threading._shutdown()  # the non-daemon threads, as Python joins them first
    atexit._run_exitfuncs()
    layers = [[], []]  # one pass over the heap; (isinstance: lazy objects would warn)
    for obj in gc.get_objects():
        for layer, kinds in zip(layers, FLUSHED):
            if type(obj) in kinds:
                layer.append(obj)
    for obj in (*layers[0], *layers[1]):
        try:
            if not obj.closed:
                obj.flush()
        except (OSError, ValueError):  # a pipe closed by its reader, a detached layer
            pass
    ctypes.CDLL(None).fflush(None)
    if sig:
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(code)


def become(request: dict, fds: list[int]) -> None:
    """Take the command's descriptors, folder, environment and argv, and run it as
    `__main__` (its exceptions and exit code reach `run_as_python`)."""
    import fcntl
    import resource
    import runpy

    os.setpgid(0, 0)  # its own group, which the server kills if the launcher is SIGKILLed
    targets = request["fds"]
    low = max(targets, default=2) + 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = low + len(fds) + 64  # above the targets, for a while (RLIM_INFINITY is -1)
    if 0 <= soft < room:
        resource.setrlimit(resource.RLIMIT_NOFILE, (room if hard < 0 else min(room, hard), hard))
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, low) for fd in fds]
    for fd in _open_fds(-1):
        if fd not in moved:
            os.close(fd)
    for target, fd in zip(targets, moved):
        os.dup2(fd, target)
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    unbuffered = request["argv"][:1] == ["-u"] or bool(os.environ.get("PYTHONUNBUFFERED"))
    for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
        if stream is not None and fd in targets:
            stream.reconfigure(line_buffering=fd == 2 or os.isatty(fd), write_through=unbuffered)
    _set_threads(request["env"])
    sys.executable = request["env"].get("LIGHTNING_MIA_TEST_LAUNCHER", sys.executable)
    import multiprocessing

    multiprocessing.set_executable(sys.executable)  # its spawned workers start warm too
    kind, target, rest = command(request["argv"])
    if kind == "spawn":  # as `python -c`: a bare __main__, the working folder first on the path
        import types

        main = sys.modules["__main__"] = types.ModuleType("__main__")
        sys.argv, sys.path[0] = ["-c", *rest], ""
        exec(compile(target, "<string>", "exec"), main.__dict__)
    elif kind == "-m":
        sys.argv = ["-m", *rest]
        sys.path[0] = os.getcwd()
        for name in (target, f"{target}.__main__"):  # as in a fresh process: run, not imported
            sys.modules.pop(name, None)
        runpy._run_module_as_main(target, alter_argv=True)
    else:
        sys.argv = [target, *rest]
        sys.path[0] = os.path.dirname(os.path.abspath(target))
        runpy.run_path(os.path.abspath(target), run_name="__main__")  # (__file__ absolute)


def _set_threads(env: dict[str, str]) -> None:
    """torch's threads as a fresh process takes them (OpenMP read the server's environment)."""
    import torch

    want = int(env.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
