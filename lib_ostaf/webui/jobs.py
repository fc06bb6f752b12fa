"""One training job at a time: its progress, log, live preview, result and interruption.

Shared by the WebUI tab and the API routes of any host, so a second training — from either
side — is refused while one runs (training shares the loaded model; two at once would
corrupt each other). Thread-safe; the host glue adds its own lock/progress plumbing.
"""

from __future__ import annotations

import base64
import io
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lib_ostaf.errors import OstafError

MAX_LOG_LINES = 500


class JobBusy(OstafError):
    """A training job is already queued or running."""


@dataclass
class Job:
    id: str
    kind: str
    status: str = "queued"
    step: int = 0
    total: int = 0
    loss: float | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    log: list[str] = field(default_factory=list)
    error: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    preview: Any = None  # latest PIL preview image
    preview_id: int = 0
    phase: str = ""  # "training", then e.g. "rendering the λ sweep"
    after_total: int = 0  # progress units after the training steps (the λ sweep)
    after_done: int = 0
    images: dict[str, Any] = field(default_factory=dict, repr=False)  # e.g. the λ sweep
    stop: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")

    @property
    def progress(self) -> float:
        if self.status == "done":
            return 1.0
        units = self.total + self.after_total
        return min(1.0, (self.step + self.after_done) / units) if units else 0.0

    def to_json(self, *, with_preview: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "step": self.step,
            "total": self.total,
            "progress": round(self.progress, 4),
            "phase": self.phase,
            "loss": self.loss,
            "elapsed": round((self.finished or time.time()) - (self.started or time.time()), 2),
            "log": list(self.log[-50:]),
            "error": self.error,
            "result": dict(self.result),
            "preview_id": self.preview_id,
        }
        if with_preview and self.preview is not None:
            out["preview"] = png_base64(self.preview)
        return out


class JobManager:
    """Holds the current (or last) job; refuses a second while one is active."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.current: Job | None = None

    def begin(self, kind: str = "attribute") -> Job:
        with self._lock:
            if self.current is not None and self.current.active:
                raise JobBusy(
                    f"a training job ({self.current.id}) is already {self.current.status}; "
                    "wait for it to finish or interrupt it"
                )
            job = Job(id=f"ostaf-{next(self._ids)}-{int(time.time())}", kind=kind)
            self.current = job
            return job

    def get(self, job_id: str | None = None) -> Job | None:
        job = self.current
        if job is None or (job_id and job.id != job_id):
            return None
        return job

    def interrupt(self, job_id: str | None = None) -> Job | None:
        job = self.get(job_id)
        if job is not None and job.active:
            job.stop.set()
            self.log(job, "interrupt requested")
        return job

    # -- updates from the training thread -------------------------------------------------
    def start(self, job: Job, total: int, after: int = 0) -> None:
        """``after``: progress units after the ``total`` training steps (the λ sweep)."""
        with self._lock:
            job.status, job.total, job.started = "running", total, time.time()
            job.phase, job.after_total, job.after_done = "training", max(0, after), 0

    def update(self, job: Job, step: int, total: int, loss: float | None = None) -> None:
        with self._lock:
            job.step, job.total, job.loss = step, total, loss

    def set_phase(self, job: Job, label: str, done: int) -> None:
        """A phase after training: its label and the units done of ``job.after_total``."""
        with self._lock:
            job.phase, job.after_done = label, min(max(0, done), job.after_total)

    def log(self, job: Job, line: str) -> None:
        with self._lock:
            job.log.append(f"[{time.strftime('%H:%M:%S')}] {line}")
            del job.log[:-MAX_LOG_LINES]

    def set_preview(self, job: Job, image: Any) -> None:
        with self._lock:
            job.preview = image
            job.preview_id += 1

    def finish(self, job: Job, result: dict[str, Any]) -> None:
        with self._lock:
            job.status, job.result, job.finished = "done", dict(result), time.time()
            job.step = job.total

    def fail(self, job: Job, error: BaseException | str, *, interrupted: bool = False) -> None:
        with self._lock:
            job.status = "interrupted" if interrupted else "failed"
            job.error, job.finished = str(error), time.time()

    def run(self, job: Job, fn: Callable[[Job], dict[str, Any]]) -> Job:
        """Run ``fn(job)`` here, recording its result or its error on the job."""
        from lib_ostaf.errors import Interrupted

        try:
            result = fn(job)
        except Interrupted as e:
            self.fail(job, e, interrupted=True)
        except OstafError as e:
            self.fail(job, e)
        except Exception as e:  # an unexpected bug: keep the WebUI alive, say what happened
            self.fail(job, f"{type(e).__name__}: {e}")
        else:
            self.finish(job, result)
        return job

    def run_in_thread(self, job: Job, fn: Callable[[Job], dict[str, Any]]) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(job, fn), name=job.id, daemon=True)
        thread.start()
        return thread


def png_base64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
