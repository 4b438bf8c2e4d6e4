"""Slicer's side of the FusionINN worker (:mod:`FusionINNLib.worker`): start it, send jobs, poll replies.

Runs inside 3D Slicer's process, so it imports neither torch nor the compute modules, starts no
thread and changes no process-wide state. The module's ``QTimer`` calls :meth:`WorkerJob.poll`;
each poll reads whatever the worker has written to its stdout pipe *without blocking* (POSIX:
non-blocking descriptor; Windows: ``PeekNamedPipe`` first) and returns a
:class:`~FusionINNLib.slicer_support.JobStatus`. Nothing here waits on the worker unless a script
calls :meth:`WorkerJob.wait`.

Temporary files: every job gets its own folder ``<root>/job-<n>`` under the client's root (in
Slicer: a ``FusionINN-<pid>-*`` folder in Slicer's temporary directory), holding the inputs the
module wrote and the outputs the worker wrote, as ``.npy`` files. The module reads the outputs into
nodes and then calls :meth:`WorkerJob.cleanup`, which deletes the folder. The worker's stderr goes
to ``<root>/worker.log`` (its tail is quoted when the worker dies). :meth:`WorkerClient.stop` deletes
the root; the root of a process that died without stopping (a crash) is deleted by the next client.

Cancel: :meth:`WorkerJob.cancel` sends ``cancel``; the core stops at its next check (between
batches of slices). If no reply has come :data:`CANCEL_TIMEOUT` seconds later, the worker is killed
(and restarted by the next job): a cancel always ends within a second. The job folder is deleted
and hidden temporary files that atomic writes left in the job's ``watch_folders`` are removed, so
a cancelled job leaves nothing half-made.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .slicer_support import JobStatus

CANCEL_TIMEOUT = 0.6  # s between the cancel request and killing the worker
STARTUP_TIMEOUT = 300.0  # s until the worker must have said "ready" (the first torch import is slow)
LOG_TAIL_LINES = 12
# What atomic writes (FusionINNLib.io.atomic.temporary_sibling) leave behind if killed mid-write.
TEMPORARY_SIBLING = re.compile(r"^\..+\.tmp[^/\\]*$")


class WorkerError(RuntimeError):
    """A job failed in the worker (``details`` holds the worker's traceback) or the worker died."""

    def __init__(self, message: str, details: str = "", error_type: str = ""):
        super().__init__(message)
        self.details = details
        self.error_type = error_type


class WorkerCancelled(RuntimeError):
    """The job was cancelled (cooperatively, or by killing the worker)."""


class _PipeReader:
    """Non-blocking reads of a pipe's complete lines, from the thread that polls."""

    def __init__(self, stream):
        self._stream = stream
        self._fd = stream.fileno()
        self._buffer = b""
        self.eof = False
        self._windows_handle = None
        if os.name == "nt":  # pragma: no cover - exercised on Windows only
            import msvcrt

            self._windows_handle = msvcrt.get_osfhandle(self._fd)
        else:
            os.set_blocking(self._fd, False)

    def _available(self) -> int:
        if self._windows_handle is None:
            return 1 << 16
        import _winapi  # pragma: no cover

        try:  # pragma: no cover
            available, _left = _winapi.PeekNamedPipe(self._windows_handle, 0)
        except OSError:  # pragma: no cover - the worker has closed its end
            self.eof = True
            return 0
        return int(available)  # pragma: no cover

    def read_lines(self) -> List[str]:
        while not self.eof:
            count = self._available()
            if count <= 0:
                break
            try:
                chunk = os.read(self._fd, count)
            except BlockingIOError:
                break
            except OSError:
                self.eof = True
                break
            if not chunk:
                self.eof = True
                break
            self._buffer += chunk
            if self._windows_handle is not None:  # pragma: no cover
                continue
        *lines, self._buffer = self._buffer.split(b"\n")
        return [line.decode("utf-8", errors="replace") for line in lines if line.strip()]


STALE_FOLDER = re.compile(r"^FusionINN-(\d+)-")


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # pragma: no cover - no cheap check without psutil: keep the folder
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_folders(parent: str) -> List[str]:
    """Delete ``FusionINN-<pid>-*`` folders of processes that no longer run (a crashed Slicer)."""
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        match = STALE_FOLDER.match(entry.name)
        if match and entry.is_dir() and int(match.group(1)) != os.getpid() and not _process_alive(int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def default_worker_command(python: Optional[str] = None) -> List[str]:
    return [python or sys.executable, "-m", "FusionINNLib.worker"]


class WorkerClient:
    """One persistent worker process and the jobs sent to it, one at a time.

    ``command`` defaults to ``[python, "-m", "FusionINNLib.worker"]``; ``env`` to this process's
    environment with ``library_path`` (the folder holding ``FusionINNLib``) first on PYTHONPATH.
    ``temp_root``: where the client's folder of job folders is created.
    """

    def __init__(self, command: Optional[Sequence[str]] = None, env: Optional[Dict[str, str]] = None,
                 library_path: Optional[str] = None, temp_root: Optional[str] = None,
                 cancel_timeout: float = CANCEL_TIMEOUT, startup_timeout: float = STARTUP_TIMEOUT):
        self.command = list(command or default_worker_command())
        base_env = dict(os.environ if env is None else env)
        library_path = library_path or str(Path(__file__).resolve().parents[1])
        parts = [library_path] + [p for p in base_env.get("PYTHONPATH", "").split(os.pathsep) if p]
        base_env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
        base_env.setdefault("PYTHONIOENCODING", "utf-8")
        base_env["PYTHONUNBUFFERED"] = "1"
        self.env = base_env
        self.cancel_timeout = float(cancel_timeout)
        self.startup_timeout = float(startup_timeout)
        self._temp_parent = temp_root
        self.root: Optional[Path] = None
        self._process: Optional[subprocess.Popen] = None
        self._reader: Optional[_PipeReader] = None
        self._log_file = None
        self._ids = itertools.count(1)
        self._job_numbers = itertools.count(1)
        self.job: Optional[WorkerJob] = None
        self.ready: Optional[Dict[str, Any]] = None
        self.started_at: Optional[float] = None
        self.starts = 0

    # -- process -----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    def _ensure_root(self) -> Path:
        if self.root is None or not self.root.is_dir():
            if self._temp_parent:
                Path(self._temp_parent).mkdir(parents=True, exist_ok=True)
            remove_stale_folders(self._temp_parent or tempfile.gettempdir())
            self.root = Path(tempfile.mkdtemp(prefix=f"FusionINN-{os.getpid()}-", dir=self._temp_parent))
        return self.root

    def start(self) -> WorkerClient:
        """Start the worker unless it runs (returns at once: it says "ready" when its imports are done)."""
        if self.running:
            return self
        self._close_process()
        root = self._ensure_root()
        self._log_file = open(root / "worker.log", "ab")
        creationflags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if os.name == "nt" else 0
        self._process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._log_file, env=self.env, cwd=str(root), bufsize=0,
                                         creationflags=creationflags)
        self._reader = _PipeReader(self._process.stdout)
        self.ready = None
        self.started_at = time.monotonic()
        self.starts += 1
        return self

    def send(self, message: Dict[str, Any]) -> None:
        if self._process is None or self._process.stdin is None:
            raise WorkerError("the FusionINN worker is not running")
        data = (json.dumps(message) + "\n").encode("utf-8")
        try:
            self._process.stdin.write(data)
            self._process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise WorkerError("the FusionINN worker stopped unexpectedly" + self._log_hint()) from None

    def read_messages(self) -> List[Dict[str, Any]]:
        if self._reader is None:
            return []
        messages = []
        for line in self._reader.read_lines():
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue  # not a reply (the worker keeps descriptor 1 for replies; be tolerant anyway)
            if message.get("type") == "ready":
                self.ready = message
                continue
            messages.append(message)
        return messages

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self.root is None:
            return ""
        try:
            text = (self.root / "worker.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def _log_hint(self) -> str:
        code = self._process.poll() if self._process is not None else None
        tail = self.log_tail()
        last = tail.splitlines()[-1].strip() if tail else ""
        return (f" (exit code {code})" if code is not None else "") + (f": {last}" if last else "")

    def kill(self) -> None:
        """Stop the worker at once (cancel of a job that does not answer, Slicer closing)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
        self._close_process()

    def _close_process(self) -> None:
        if self._process is not None:
            for stream in (self._process.stdin, self._process.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        self._process = None
        self._reader = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the worker to end (end of stdin), kill it if it does not, and delete the temporary folder."""
        if self.job is not None and not self.job.finished:
            self.job.cancel()
        if self._process is not None and self._process.poll() is None:
            try:
                self._process.stdin.close()
            except OSError:
                pass
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    # -- jobs --------------------------------------------------------------------------------
    def new_folder(self) -> Path:
        folder = self._ensure_root() / f"job-{next(self._job_numbers)}"
        folder.mkdir(parents=True, exist_ok=False)
        return folder

    def submit(self, op: str, params: Optional[Dict[str, Any]] = None, folder: Optional[Path] = None,
               encode_params: Optional[Callable[[Any], Any]] = None, watch_folders: Sequence[str] = (),
               title: str = "") -> WorkerJob:
        """Send one job. ``params`` may hold Volumes and arrays: they are written into the job's
        folder (:mod:`FusionINNLib.jobs.codec`). Only one job runs at a time."""
        from .jobs.codec import ArrayStore, encode

        if self.job is not None and not self.job.finished:
            raise RuntimeError("another FusionINN job is running; wait for it or cancel it")
        self.start()
        folder = Path(folder) if folder is not None else self.new_folder()
        store = ArrayStore(folder)
        encoded = (encode_params or (lambda value: encode(value, store)))(params or {})
        job = WorkerJob(self, next(self._ids), op, folder, store, watch_folders, title or op)
        self.job = job
        self.send({"id": job.id, "op": op, "folder": str(folder), "params": encoded})
        return job

    def run(self, op: str, params: Optional[Dict[str, Any]] = None, timeout: Optional[float] = None,
            **options: Any) -> Any:
        """Submit and wait (scripts, self-tests); returns the decoded result, raises on error/cancel.
        The job folder is deleted afterwards, so the result's arrays are loaded into memory."""
        job = self.submit(op, params, **options)
        try:
            if not job.wait(timeout):
                job.cancel()
                job.wait(self.cancel_timeout + 5)
                raise WorkerError(f"FusionINN {op} did not finish within {timeout} s")
            status = job.poll()
            if status.cancelled:
                raise WorkerCancelled(f"FusionINN {op} was cancelled")
            if status.error is not None:
                raise status.error
            return status.result
        finally:
            job.cleanup()


class WorkerJob:
    """One job in the worker; :meth:`poll` it from the GUI thread."""

    def __init__(self, client: WorkerClient, job_id: int, op: str, folder: Path, store, watch_folders, title):
        self.client = client
        self.id = job_id
        self.op = op
        self.title = title
        self.folder = folder
        self.store = store
        self.watch_folders = [Path(p) for p in watch_folders]
        self.submitted_at = time.monotonic()
        self.started_wall = time.time()
        self.finished = False
        self.fraction = 0.0
        self._messages: List[str] = []
        self._result: Any = None
        self._error: Optional[BaseException] = None
        self._cancelled = False
        self._cancel_requested_at: Optional[float] = None
        self._ended_at: Optional[float] = None

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested_at is not None

    def cancel(self) -> None:
        if self.finished or self._cancel_requested_at is not None:
            return
        self._cancel_requested_at = time.monotonic()
        try:
            self.client.send({"op": "cancel", "id": self.id})
        except WorkerError:
            pass  # already dead: the next poll notices

    def _finish(self) -> None:
        self.finished = True
        self._ended_at = time.monotonic()
        if self.client.job is self:
            self.client.job = None

    def _handle(self, message: Dict[str, Any]) -> None:
        from .jobs.codec import decode

        if message.get("id") != self.id:
            return  # a late reply of an older job
        kind = message.get("type")
        if kind == "progress":
            self.fraction = min(max(float(message.get("fraction", 0.0)), 0.0), 1.0)
        elif kind == "log":
            self._messages.append(str(message.get("message", "")))
        elif kind == "result":
            try:
                self._result = decode(message.get("result"), self.store)
            except Exception as error:  # noqa: BLE001 - a missing/damaged output file is an error
                self._error = WorkerError(f"the worker's result could not be read: {error}")
            self._finish()
        elif kind == "cancelled":
            self._cancelled = True
            self._finish()
        elif kind == "error":
            self._error = WorkerError(str(message.get("message") or "the job failed"),
                                      str(message.get("traceback") or ""), str(message.get("error_type") or ""))
            self._finish()

    def poll(self) -> JobStatus:
        """Read what the worker sent since the last poll (never blocks); kill it if a cancel is overdue."""
        client = self.client
        if not self.finished:
            try:
                for message in client.read_messages():
                    self._handle(message)
                    if self.finished:
                        break
            except OSError as error:  # pragma: no cover
                self._error = WorkerError(f"reading from the FusionINN worker failed: {error}")
                self._finish()
        if not self.finished:
            now = time.monotonic()
            if self._cancel_requested_at is not None and now - self._cancel_requested_at > client.cancel_timeout:
                client.kill()  # the core did not reach a cancel check in time
                self._cancelled = True
                self._finish()
                self._remove_partial_files()
            elif not client.running:
                # drain what it wrote before it ended
                for message in client.read_messages():
                    self._handle(message)
                if not self.finished:
                    if self._cancel_requested_at is not None:
                        self._cancelled = True
                    else:
                        self._error = WorkerError("the FusionINN worker stopped unexpectedly" + client._log_hint(),
                                                  client.log_tail(40))
                    client.kill()
                    self._finish()
            elif client.ready is None and now - self.submitted_at > client.startup_timeout:
                client.kill()
                self._error = WorkerError(f"the FusionINN worker did not start within {client.startup_timeout:.0f} s"
                                          + client._log_hint(), client.log_tail(40))
                self._finish()
        if self._cancelled:
            self._remove_partial_files()
        messages, self._messages = self._messages, []
        end = self._ended_at if self._ended_at is not None else time.monotonic()
        status = JobStatus(running=not self.finished, fraction=self.fraction, messages=messages,
                           done=self.finished, elapsed=end - self.submitted_at)
        if self.finished:
            status.cancelled = self._cancelled
            status.result = None if self._cancelled else self._result
            status.error = None if self._cancelled else self._error
        return status

    def wait(self, timeout: Optional[float] = None, interval: float = 0.01) -> bool:
        """Poll until the job ends (scripts and tests); True if it did within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            self.poll()
            if self.finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(interval)
        return True

    def _remove_partial_files(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        for folder in self.watch_folders:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                if TEMPORARY_SIBLING.match(entry.name) and entry.is_file():
                    try:
                        if entry.stat().st_mtime >= self.started_wall - 1.0:
                            os.unlink(entry.path)
                    except OSError:
                        pass

    def cleanup(self) -> None:
        """Delete the job folder (after the outputs were read into nodes)."""
        shutil.rmtree(self.folder, ignore_errors=True)
