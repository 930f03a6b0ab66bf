"""Progress of long engine jobs: tqdm bars for people, JSON lines for programs (the Slicer module).

A :class:`Progress` reports stages, each a count of work units done out of a total. Modes:

* ``"bar"``: a tqdm bar per stage on stderr;
* ``"json"``: one JSON object per line on stdout, flushed at once (the protocol below);
* ``"none"``: silent.

The JSON-lines protocol (``invariance-explorer ... --progress json``), one object per line,
every one with ``"event"``:

* ``{"event": "stage", "stage": "denoising", "total": 40, "message": "Denoising 40 slices"}``
  — a stage starts (``total`` work units, ``message`` for a status line);
* ``{"event": "progress", "stage": "denoising", "done": 12, "total": 40, "fraction": 0.3}``
  — units done so far in the current stage;
* ``{"event": "done", "outputs": {"denoised": "/path/out.nrrd"}, "message": "..."}`` — the
  job finished and wrote ``outputs`` (names -> paths);
* ``{"event": "error", "message": "...", "kind": "input"}`` — the job failed (``kind``:
  ``"input"`` for the user's input, settings or files, ``"untrusted"`` (with ``"folder"``)
  for a model folder whose code this machine does not trust (:mod:`.trusted_code`),
  ``"cancelled"`` when interrupted (SIGINT), ``"internal"`` otherwise); the process then
  exits with a non-zero status.

In JSON mode nothing else is written to stdout; human-readable text goes to stderr, where
each warning is one line starting with :data:`WARNING_PREFIX` (the panel shows them as notes).
"""

from __future__ import annotations

import json
import sys
from typing import Callable, Dict, Optional, TextIO

#: Progress modes of :class:`Progress` and of the CLI's ``--progress``.
MODES = ("bar", "json", "none")

#: How the CLI starts a warning's line on stderr: ``invariance-explorer: warning: MESSAGE``.
WARNING_PREFIX = "invariance-explorer: warning: "

#: How engine functions report their stages: ``progress(stage, done, total)`` (e.g. the
#: sampler's "encoding" then "sampling"; :meth:`Progress.callback` makes one).
ProgressCallback = Callable[[str, int, int], None]


class Progress:
    """Reports a job's stages and progress in one of :data:`MODES` (see the module docstring).

    Args:
        mode: "bar", "json" or "none".
        stream: where JSON lines go (default: ``sys.stdout`` at the time of writing).
    """

    def __init__(self, mode: str = "bar", stream: Optional[TextIO] = None):
        if mode not in MODES:
            raise ValueError(f"unknown progress mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode, self._stream = mode, stream
        self._bar = None
        self._stage: Optional[str] = None
        self._total = 0

    def _emit(self, record: dict) -> None:
        stream = self._stream or sys.stdout
        stream.write(json.dumps(record) + "\n")
        stream.flush()

    def stage(self, name: str, total: int, message: str = "") -> Callable[[int], None]:
        """Start stage ``name`` of ``total`` units (closing the previous one); return
        ``update(done)``, to be called with the number of units done so far."""
        self.close()
        self._stage, self._total = name, int(total)
        if self.mode == "json":
            self._emit({"event": "stage", "stage": name, "total": self._total, "message": message or name})
        elif self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self._total, desc=message or name, file=sys.stderr)
        return self.update

    def callback(self, messages: Optional[Dict[str, object]] = None) -> ProgressCallback:
        """A :data:`ProgressCallback` for an engine function: each new ``(stage, total)`` starts
        a stage, titled ``messages[stage]`` (a text, or a function of ``total`` giving one;
        default: the stage's name)."""
        current = {}

        def report(stage: str, done: int, total: int) -> None:
            if current.get("stage") != (stage, total):
                current["stage"] = (stage, total)
                title = (messages or {}).get(stage, stage)
                current["update"] = self.stage(stage, total, title(total) if callable(title) else title)
            current["update"](done)

        return report

    def update(self, done: int) -> None:
        """``done`` units of the current stage are finished."""
        if self.mode == "json":
            fraction = done / self._total if self._total else 1.0
            self._emit({"event": "progress", "stage": self._stage, "done": int(done), "total": self._total,
                        "fraction": round(fraction, 4)})
        elif self._bar is not None:
            self._bar.update(int(done) - self._bar.n)

    def close(self) -> None:
        """End the current stage's bar, if any."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def done(self, outputs: Dict[str, str], message: str = "") -> None:
        """The job finished and wrote ``outputs`` (name -> path); people read ``message``."""
        self.close()
        if self.mode == "json":
            self._emit({"event": "done", "outputs": {k: str(v) for k, v in outputs.items()}, "message": message})
        if message:
            print(message, file=sys.stderr if self.mode == "json" else sys.stdout)

    def error(self, message: str, kind: str = "input", **fields) -> None:
        """The job failed: ``message`` says what went wrong and what to do (``fields``: more
        for the reader, e.g. the ``folder`` of an "untrusted" model folder)."""
        self.close()
        if self.mode == "json":
            self._emit({"event": "error", "message": message, "kind": kind, **fields})
