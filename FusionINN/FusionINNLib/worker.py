"""The FusionINN worker: a separate process that runs the module's heavy jobs (``python -m FusionINNLib.worker``).

3D Slicer's Python runs without thread support in its Qt event loop (PythonQt never releases the
GIL there), so compute on a thread of Slicer's own process starves. The module therefore starts
this worker once, with the same ``FusionINNLib`` code as the ``fusioninn`` command line, and keeps
it: torch, the model and the normalized inputs of the live Jacobian stay loaded between jobs.

Protocol (JSON lines, UTF-8, one object per line):

requests on stdin
    ``{"id": N, "op": "<operation>", "folder": "<job folder>", "params": {...}}`` runs one job;
    ``params`` is encoded with :mod:`FusionINNLib.jobs.codec` (voxels are ``.npy`` files in the
    job folder, never inside the JSON). ``{"op": "cancel", "id": N}`` asks job N to stop (read by
    a thread while the job runs; the core checks it between batches of slices).
    ``{"op": "shutdown"}`` or the end of stdin ends the worker.
replies on stdout
    ``{"type": "ready", "pid": .., "version": ..}`` once at start-up, then per job any number of
    ``{"id": N, "type": "progress", "fraction": f}`` and ``{"id": N, "type": "log", "message": s}``
    and exactly one of ``{"id": N, "type": "result", "result": ..}``,
    ``{"id": N, "type": "cancelled"}`` or ``{"id": N, "type": "error", "message": s, "error_type": t,
    "traceback": tb}``. Result voxels are ``.npy`` files written (atomically) into the job folder.

Only the protocol uses file descriptor 1: at start-up the worker moves it aside and points
descriptor 1 at stderr, so a stray ``print`` or a C library writing to stdout can never corrupt a
reply. Process-wide settings that must not happen inside Slicer (glibc's allocator tuning, native
output capture, logger levels) happen here and in the command line, never in Slicer's process.

Operations are a dispatch table (:data:`OPERATIONS`). ``job`` runs any request of the jobs layer
(:mod:`FusionINNLib.jobs`: fuse, decompose, score, explain, batch), the same code as the command
line; the others are what only a long-lived process can do (``jacobian``: the live Jacobian, whose
normalized inputs stay in memory between crosshair moves) or small helpers (``difference``,
``devices``, ``ping``; ``sleep``/``hang``/``print`` for tests of progress, cancel and stdout).
"""
from __future__ import annotations

import io
import json
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Optional

PROTOCOL_VERSION = 1
PROGRESS_INTERVAL = 0.05  # s: progress replies at most 20 per second


class JobContext:
    """What an operation gets besides its parameters: progress, log, cancel check, caches, store."""

    def __init__(self, worker: Worker, job_id: Any, folder: Optional[str]):
        from .jobs.codec import ArrayStore

        self.worker = worker
        self.job_id = job_id
        self.folder = folder
        self.store = ArrayStore(folder) if folder else None
        self.cancel_event = threading.Event()
        self._last_progress = 0.0

    def progress(self, fraction: float) -> None:
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL or fraction >= 1.0:
            self._last_progress = now
            self.worker.send({"id": self.job_id, "type": "progress", "fraction": float(fraction)})

    def log(self, message: str) -> None:
        self.worker.send({"id": self.job_id, "type": "log", "message": str(message)})

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def model(self, spec: Any):
        return self.worker.model(spec)


class Worker:
    """Reads requests, runs them one at a time on the main thread, writes replies."""

    def __init__(self, reply_stream: io.TextIOBase, request_stream: io.TextIOBase):
        self._out = reply_stream
        self._in = request_stream
        self._send_lock = threading.Lock()
        self._requests: queue.Queue = queue.Queue()
        self._current: Optional[JobContext] = None
        self._current_lock = threading.Lock()
        self._model_identity: Any = None
        self.sessions: Dict[Any, Any] = {}  # the live Jacobian's VolumeExplainer

    # -- replies -----------------------------------------------------------------------------
    def send(self, message: Dict[str, Any]) -> None:
        text = json.dumps(message, allow_nan=True)
        with self._send_lock:
            self._out.write(text + "\n")
            self._out.flush()

    # -- requests ----------------------------------------------------------------------------
    def _read_requests(self) -> None:
        """stdin reader thread: cancel requests act at once, others queue for the main thread."""
        for line in self._in:
            line = line.strip()
            if not line:
                continue
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                self.send({"type": "error", "message": f"unreadable request: {line[:200]}"})
                continue
            op = message.get("op")
            if op == "cancel":
                with self._current_lock:
                    current = self._current
                if current is not None and current.job_id == message.get("id"):
                    current.cancel_event.set()
                continue
            if op == "shutdown":
                break
            self._requests.put(message)
        # end of input (Slicer closed the pipe or quit): stop what runs and leave
        with self._current_lock:
            if self._current is not None:
                self._current.cancel_event.set()
        self._requests.put(None)

    def model(self, spec: Any):
        """The model named by ``spec`` (a checkpoint path, None = the bundled model), loaded once per
        file by the jobs layer's cache; the live Jacobian's session is dropped when the model changes."""
        from .jobs import DEFAULT_MODELS

        loaded = DEFAULT_MODELS.get(None if spec in (None, "") else str(spec))
        if self._model_identity is not None and self._model_identity is not loaded:
            self.sessions.clear()
        self._model_identity = loaded
        return loaded

    def run_forever(self) -> int:
        reader = threading.Thread(target=self._read_requests, name="FusionINN worker stdin", daemon=True)
        reader.start()
        self.send({"type": "ready", "pid": os.getpid(), "protocol": PROTOCOL_VERSION,
                   "version": _version(), "python": sys.version.split()[0]})
        while True:
            message = self._requests.get()
            if message is None:
                return 0
            self._run_one(message)

    def _run_one(self, message: Dict[str, Any]) -> None:
        from .core.engine import Cancelled
        from .jobs.codec import decode, encode

        job_id = message.get("id")
        op = message.get("op")
        context = JobContext(self, job_id, message.get("folder"))
        with self._current_lock:
            self._current = context
        try:
            operation = OPERATIONS.get(op)
            if operation is None:
                raise ValueError(f"unknown worker operation {op!r}")
            params = decode(message.get("params") or {}, context.store)
            result = operation(params, context)
            if context.cancelled():
                raise Cancelled("cancelled by the user")
            self.send({"id": job_id, "type": "result", "result": encode(result, context.store)})
        except Cancelled:
            self.send({"id": job_id, "type": "cancelled"})
        except BaseException as error:  # noqa: BLE001 - every failure becomes one reply
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            if context.cancelled():
                self.send({"id": job_id, "type": "cancelled"})
            else:
                self.send({"id": job_id, "type": "error", "message": gui_message(error),
                           "error_type": type(error).__name__, "traceback": traceback.format_exc()})
        finally:
            with self._current_lock:
                self._current = None


def gui_message(error: BaseException) -> str:
    """One line for the Slicer module's user: typed errors (:mod:`FusionINNLib.core.errors`) are worded for
    the GUI (controls, never command-line flags), others are their text."""
    from .core.errors import FusionINNError

    text = error.message("gui") if isinstance(error, FusionINNError) else str(error)
    return " ".join(str(text).split()) or type(error).__name__


def _version() -> str:
    from . import __version__

    return __version__


# -- operations ---------------------------------------------------------------------------------
Operation = Callable[[Dict[str, Any], JobContext], Any]


def op_ping(params: Dict[str, Any], context: JobContext) -> Dict[str, Any]:
    return {"pid": os.getpid(), "version": _version(), "torch_loaded": "torch" in sys.modules,
            "echo": params.get("echo")}


def op_sleep(params: Dict[str, Any], context: JobContext) -> Dict[str, Any]:
    """A job that only waits (for tests of progress and cancel): ``seconds``, cancel checked every 10 ms."""
    from .core.engine import Cancelled

    seconds = float(params.get("seconds", 1.0))
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if context.cancelled():
            raise Cancelled("cancelled by the user")
        context.progress((time.monotonic() - start) / seconds)
        time.sleep(0.01)
    return {"slept": seconds}


def op_hang(params: Dict[str, Any], context: JobContext) -> Dict[str, Any]:
    """A job that never checks its cancel flag (for the kill-on-cancel test): sleeps ``seconds``,
    then writes a file into the job folder."""
    time.sleep(float(params.get("seconds", 30.0)))
    if context.folder:
        Path(context.folder, "late.txt").write_text("written after the job should have been cancelled")
    return {}


def op_print(params: Dict[str, Any], context: JobContext) -> Dict[str, Any]:
    """Writes to stdout the ways stray output happens (Python print, a C library's write to
    descriptor 1), for the test that replies stay readable."""
    text = str(params.get("text", "stray output"))
    print(text)
    sys.stdout.flush()
    os.write(1, (text + "\n").encode("utf-8"))
    return {"printed": text}


def op_devices(params: Dict[str, Any], context: JobContext) -> Dict[str, Any]:
    from .core.engine import describe_devices

    return {"devices": describe_devices()}


def op_job(params: Dict[str, Any], context: JobContext) -> Any:
    """One request of the jobs layer (:mod:`FusionINNLib.jobs`): fuse, decompose, score, explain,
    batch. ``params`` is the request's ``to_dict`` form (its ``kind`` names the class); the reply is
    the result's ``to_dict`` form, voxels as ``.npy`` files in the job folder."""
    from . import jobs

    request = jobs.message_from_dict(params, context.store)
    result = jobs.run(request, progress=context.progress, cancel=context.cancelled, log=context.log,
                      models=jobs.DEFAULT_MODELS)
    return result.to_dict(context.store)


def op_jacobian(params: Dict[str, Any], context: JobContext) -> Dict[str, Any]:
    """The Jacobian images of one fused voxel. The inputs are normalized once per ``session`` (the
    moving crosshair sends only the point), so an update costs one small vector-Jacobian product."""
    from .jobs.explain import VolumeExplainer

    model = context.model(params.get("model"))
    options = params.get("options") or {}
    key = (str(params.get("session")), json.dumps(options, sort_keys=True))
    explainer = context.worker.sessions.get(key)
    if explainer is None:
        if "volume1" not in params:
            raise LookupError("jacobian session expired: send the inputs again")
        explainer = VolumeExplainer(params["volume1"], params["volume2"], model, log=context.log, **options)
        context.worker.sessions.clear()
        context.worker.sessions[key] = explainer
    jacobian1, jacobian2 = explainer.jacobian(params["index"], target=params.get("target", "fused"))
    return {"jacobian1": jacobian1, "jacobian2": jacobian2, "index": list(params["index"])}


def op_has_session(params: Dict[str, Any], context: JobContext) -> Dict[str, Any]:
    key = (str(params.get("session")), json.dumps(params.get("options") or {}, sort_keys=True))
    return {"present": key in context.worker.sessions}


def op_difference(params: Dict[str, Any], context: JobContext) -> Dict[str, Any]:
    from .jobs.batch import difference_volume

    return {"differences": [difference_volume(decomposed, source) for decomposed, source in params["pairs"]]}


OPERATIONS: Dict[str, Operation] = {
    "ping": op_ping,
    "sleep": op_sleep,
    "hang": op_hang,
    "print": op_print,
    "devices": op_devices,
    "job": op_job,
    "jacobian": op_jacobian,
    "has_session": op_has_session,
    "difference": op_difference,
}


# -- process set-up -----------------------------------------------------------------------------
def _protocol_streams():
    """(reply stream on the original stdout, request stream on stdin); descriptor 1 → stderr."""
    sys.stdout.flush()
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    replies = io.TextIOWrapper(os.fdopen(reply_fd, "wb", buffering=0), encoding="utf-8", newline="\n",
                               write_through=True)
    requests = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline=None)
    return replies, requests


def main(argv: Optional[list] = None) -> int:
    replies, requests = _protocol_streams()
    from .core.engine import tune_cpu_allocator
    from .core.process import allow_process_tuning

    allow_process_tuning()  # the worker owns its process; Slicer's process never does this
    tune_cpu_allocator()
    # Import the heavy parts once, before the first job (torch takes seconds).
    from .jobs import explain, pipeline  # noqa: F401

    return Worker(replies, requests).run_forever()


if __name__ == "__main__":
    sys.exit(main())
