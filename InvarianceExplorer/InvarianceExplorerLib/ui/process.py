"""Run the engine CLI in a child process and follow its JSON-lines progress without blocking.

The engine (torch) runs in a separate process, as Slicer's AI extensions do: the GUI stays
responsive, a crash cannot take the GUI down, and Cancel can stop everything at once.

* :func:`engine_python` is the interpreter for the child: ``PythonSlicer`` inside 3D
  Slicer, ``sys.executable`` outside it.
* :class:`EngineJob` (no Qt) starts ``python -m InvarianceExplorerLib <args> --progress json``
  in its own process group (POSIX session; a new process group on Windows), reads its
  stdout lines in a thread and queues the protocol's events (:mod:`..progress`): ``stage``,
  ``progress``, ``done``, ``error``. When the process ends without a ``done`` or ``error``
  line (a crash, an argument error), an ``error`` event is made from its exit status and
  the end of its stderr. :meth:`EngineJob.cancel` kills the whole process group and removes
  the job's temporary folder; a ``cancelled`` event follows.
* :class:`ProcessRunner` drives an :class:`EngineJob` from the Qt event loop (a ``QTimer``
  drains the queue in the GUI thread) and calls plain Python callbacks, so it works under
  PythonQt and PySide6 alike.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

#: Where the engine package lives (its parent folder goes on the child's PYTHONPATH).
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])

#: Events of the JSON-lines protocol, plus ``cancelled`` made by :meth:`EngineJob.cancel`.
EVENTS = ("stage", "progress", "done", "error", "cancelled")


def engine_python() -> str:
    """The Python interpreter that runs the engine in a child process.

    In 3D Slicer (``slicer`` imported) it is ``PythonSlicer`` (Slicer's own Python with
    Slicer's packages, the launcher that sets up its environment), found on ``PATH`` or next
    to ``sys.executable`` (which Slicer sets to that PythonSlicer). Outside Slicer it is
    ``sys.executable``.
    """
    if "slicer" not in sys.modules:
        return sys.executable
    names = ("PythonSlicer.exe", "PythonSlicer") if os.name == "nt" else ("PythonSlicer",)
    for name in names:
        found = shutil.which(name)
        if found:
            return found
        beside = os.path.join(os.path.dirname(sys.executable), name)
        if os.path.isfile(beside):
            return beside
    raise RuntimeError("PythonSlicer was not found on PATH or next to the Slicer executable, so the engine "
                       "cannot run in its own process; reinstall 3D Slicer")


def engine_command(args: Sequence[str], python: Optional[str] = None) -> List[str]:
    """The full command line that runs ``invariance-explorer <args>`` with ``python``."""
    return [python or engine_python(), "-m", "InvarianceExplorerLib", *map(str, args)]


def engine_environment(base: Optional[dict] = None) -> Dict[str, str]:
    """The child's environment: ``base`` (default ``os.environ``) with the engine package
    first on ``PYTHONPATH``, unbuffered output, and no imports from the working folder."""
    env = dict(os.environ if base is None else base)
    paths = [PACKAGE_PARENT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != PACKAGE_PARENT]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONSAFEPATH"] = "1"  # Python >= 3.11: modules in the working folder do not shadow installed ones
    return env


class EngineJob:
    """One run of the engine CLI in a child process (see the module docstring).

    Args:
        args: CLI arguments after the program name, e.g. ``["denoise", "--model", ...,
            "--progress", "json"]`` (``--progress json`` is added when missing).
        python: interpreter (default :func:`engine_python`).
        temp_dir: a folder this job owns (e.g. the exported input): removed when the job is
            cancelled or :meth:`cleanup` is called; never removed while the process runs.
        remove_on_cancel: further paths (e.g. a partly written output folder) removed on cancel.
        env: environment (default :func:`engine_environment`).
    """

    def __init__(self, args: Sequence[str], *, python: Optional[str] = None, temp_dir=None,
                 remove_on_cancel: Sequence = (), env: Optional[dict] = None):
        args = [str(a) for a in args]
        if "--progress" not in args:
            args += ["--progress", "json"]
        self.command = engine_command(args, python)
        self.temp_dir = None if temp_dir is None else Path(temp_dir)
        self.remove_on_cancel = [Path(p) for p in remove_on_cancel]
        self.env = engine_environment() if env is None else env
        self.events: "queue.Queue[dict]" = queue.Queue()
        self.process: Optional[subprocess.Popen] = None
        self.cancelled = False
        self.finished_event: Optional[dict] = None  # the done / error / cancelled event, once known
        self._stderr_tail: deque = deque(maxlen=200)
        self._threads: List[threading.Thread] = []
        self._final_sent = threading.Event()
        self._lock = threading.Lock()

    # -- life cycle

    def start(self) -> "EngineJob":
        """Start the child process in its own process group and the reader threads."""
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # setsid(): the child leads a new process group
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=self.env, text=True, encoding="utf-8",
                                        errors="replace", bufsize=1, **kwargs)
        out = threading.Thread(target=self._read_stdout, name="engine-stdout", daemon=True)
        err = threading.Thread(target=self._read_stderr, name="engine-stderr", daemon=True)
        self._threads = [out, err]
        err.start()
        out.start()
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return None if self.process is None else self.process.poll()

    def warnings(self) -> List[str]:
        """The Python warnings the child printed (e.g. "CUDA out of memory ...; continuing on the
        CPU"), as their messages, without repeats."""
        from ..progress import WARNING_PREFIX

        found = []
        for line in self._stderr_tail:
            text = line.strip()
            message = text[len(WARNING_PREFIX):].strip() if text.startswith(WARNING_PREFIX) else ""
            if message and message not in found:
                found.append(message)
        return found

    def poll(self) -> List[dict]:
        """The events that arrived since the last call, oldest first (never blocks)."""
        events = []
        while True:
            try:
                events.append(self.events.get_nowait())
            except queue.Empty:
                return events

    def wait(self, timeout: Optional[float] = None) -> Optional[dict]:
        """Block until the job has finished (process ended and output read); return its final event."""
        if not self._final_sent.wait(timeout):
            raise subprocess.TimeoutExpired(self.command, timeout)
        return self.finished_event

    def cancel(self, grace: float = 3.0) -> None:
        """Stop the child and every process it started (SIGTERM to its process group, SIGKILL
        after ``grace`` seconds), then remove the temporary folder and ``remove_on_cancel``
        (also when the process had already ended: its results are then not wanted)."""
        with self._lock:
            if not self._final_sent.is_set():
                self.cancelled = True
        if self.cancelled and self.process is not None:
            kill_process_tree(self.process, grace)
        for t in self._threads:
            t.join(timeout=5)
        for path in self.remove_on_cancel:
            _remove(path)
        self.cleanup()

    def cleanup(self) -> None:
        """Remove the job's temporary folder (after its results were read back)."""
        if self.temp_dir is not None and not self.running:
            _remove(self.temp_dir)

    # -- threads

    def _read_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        final = None  # the stream's done / error line, held back until the process has ended
        for line in self.process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                self._stderr_tail.append(line)  # not protocol: keep it for an error message
                continue
            if not isinstance(event, dict) or event.get("event") not in ("stage", "progress", "done", "error"):
                continue
            if event["event"] in ("done", "error"):
                final = event
            elif not self.cancelled:
                self.events.put(event)
        self.process.wait()
        self._threads[1].join(timeout=5)  # all of stderr, for the message below
        if self.cancelled:
            final = {"event": "cancelled", "message": "Cancelled"}
        elif final is None or (final["event"] == "done" and self.process.returncode != 0):
            final = {"event": "error", "kind": "internal", "message": self._exit_message()}
        self.finished_event = final
        self.events.put(final)
        self._final_sent.set()

    def _read_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            line = line.rstrip()
            if line:
                self._stderr_tail.append(line)

    def _exit_message(self) -> str:
        code = self.process.returncode if self.process else None
        lines = [line for line in self._stderr_tail if line.strip()]
        # an argparse or Python error puts its one-line reason last
        reason = lines[-1] if lines else "no message"
        return f"The engine stopped with exit status {code}: {reason}"


def kill_process_tree(process: subprocess.Popen, grace: float = 3.0) -> None:
    """Stop ``process`` and its process group (it must have been started as a group leader)."""
    if process.poll() is not None and os.name == "nt":
        return
    if os.name == "nt":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True)
        process.wait(timeout=grace + 5)
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    try:  # the leader may be gone while children it started still run
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def process_group_alive(pgid: int) -> bool:
    """True if any process of group ``pgid`` still exists (POSIX)."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        try:
            path.unlink()
        except OSError:
            pass


class ProcessRunner:
    """Drives an :class:`EngineJob` from the Qt event loop and reports through callbacks.

    Callbacks (plain attributes, each optional): ``onStage(event)``, ``onProgress(event)``,
    ``onDone(event)``, ``onError(event)``, ``onCancelled(event)``, ``onFinished(event)``
    (after any of the last three). Events are the protocol's dicts. The runner polls every
    ``interval_ms`` milliseconds in the GUI thread; nothing blocks.
    """

    def __init__(self, interval_ms: int = 50):
        from .qtshim import qt

        self.job: Optional[EngineJob] = None
        self.onStage: Optional[Callable[[dict], None]] = None
        self.onProgress: Optional[Callable[[dict], None]] = None
        self.onDone: Optional[Callable[[dict], None]] = None
        self.onError: Optional[Callable[[dict], None]] = None
        self.onCancelled: Optional[Callable[[dict], None]] = None
        self.onFinished: Optional[Callable[[dict], None]] = None
        self._timer = qt.QTimer()
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(lambda *args: self.poll())

    @property
    def running(self) -> bool:
        return self.job is not None

    def start(self, job: EngineJob) -> EngineJob:
        """Start ``job`` (not yet started) and follow it."""
        if self.job is not None:
            raise RuntimeError("a job is already running; cancel it first")
        self.job = job
        job.start()
        self._timer.start()
        return job

    def cancel(self) -> None:
        """Kill the running job's processes and clean up; ``onCancelled`` follows at once."""
        if self.job is not None:
            self.job.cancel()
            self.poll()

    def poll(self) -> None:
        """Dispatch the events that arrived (called by the timer)."""
        job = self.job
        if job is None:
            self._timer.stop()
            return
        for event in job.poll():
            kind = event.get("event")
            callback = {"stage": self.onStage, "progress": self.onProgress, "done": self.onDone,
                        "error": self.onError, "cancelled": self.onCancelled}.get(kind)
            if kind in ("done", "error", "cancelled"):
                self._timer.stop()
                self.job = None
            if callback is not None:
                callback(event)
            if kind in ("done", "error", "cancelled"):
                if self.onFinished is not None:
                    self.onFinished(event)
                return


def sample_args(*, model: str, input_path, center_ijk: Sequence[int], count: int, seed: int, out_dir,
                device: str = "auto", batch_size: Optional[int] = None, analyze: bool = False,
                refine: bool = True) -> List[str]:
    """CLI arguments of ``invariance-explorer sample`` (the fixed contract of the engine's
    sampling command); ``center_ijk`` is the voxel (i = column, j = row, k = slice);
    ``batch_size`` None leaves it to the engine (its default for the device);
    ``analyze`` adds ``--analyze`` (the analysis goes to ``out_dir/analysis/``); without
    ``refine``, ``--refine 0,0`` turns the model folder's consistency refinement off."""
    i, j, k = (int(v) for v in center_ijk)
    return ["sample", "--model", str(model), "--input", str(input_path), "--center", f"{i},{j},{k}",
            "--count", str(int(count)), "--seed", str(int(seed))] + \
        ([] if batch_size is None else ["--batch-size", str(int(batch_size))]) + \
        ["--device", str(device), "--out", str(out_dir)] + (["--analyze"] if analyze else []) + \
        ([] if refine else ["--refine", "0,0"]) + \
        ["--progress", "json"]
