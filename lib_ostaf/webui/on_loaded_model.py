"""Training on a WebUI's loaded model, the part every host shares: check the request before
touching the model, drive the WebUI's progress bar and live preview, run the training (attribute
or objects) on the host the caller opens, keep the λ-sweep strip for the tab. Each host
(:mod:`lib_ostaf.hosts.a1111`, :mod:`lib_ostaf.hosts.forge`) adds only how it opens and
restores its model."""

from __future__ import annotations

import html
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from PIL import Image

from lib_ostaf.method.host import Host
from lib_ostaf.webui.jobs import Job, JobManager
from lib_ostaf.webui.object_job import ObjectRequest, run_object_training
from lib_ostaf.webui.training_job import Reporter, TrainRequest, run_training, sweep_units

OpenHost = Callable[[TrainRequest | ObjectRequest], AbstractContextManager[Host]]


class StateReporter(Reporter):
    """Forwards a run's progress to the job and to ``shared.state`` (the WebUI's progress bar
    and live preview); stops on the job's interrupt or the WebUI's Interrupt button."""

    def __init__(
        self, jobs: JobManager, job: Job, state: Any, steps: int = 0, after: int = 0
    ) -> None:
        self.jobs, self.job, self.state = jobs, job, state
        self.steps, self.after = steps, after

    @classmethod
    def begin(
        cls, jobs: JobManager, job: Job, steps: int, state: Any, after: int = 0
    ) -> StateReporter:
        """Start ``job`` and put the WebUI's progress bar at 0 of ``steps`` training steps
        plus ``after`` units of the λ sweep (:func:`~lib_ostaf.webui.training_job.sweep_units`),
        so the bar reaches its end only when the run does."""
        jobs.start(job, steps, after)
        state.job_count, state.job_no = 1, 0
        state.sampling_steps, state.sampling_step = steps + after, 0
        state.textinfo = "OSTAF: preparing"
        return cls(jobs, job, state, steps, after)

    def progress(self, step: int, total: int, loss: float) -> None:
        self.steps = total
        self.jobs.update(self.job, step, total, loss)
        self.state.sampling_step, self.state.sampling_steps = step, total + self.after
        self.state.textinfo = html.escape(f"OSTAF training: step {step}/{total}, loss {loss:.4f}")

    def phase(self, label: str, done: int, total: int) -> None:
        units = self.after * done // total if total else self.after
        self.jobs.set_phase(self.job, label, units)
        self.state.sampling_step = self.steps + units
        self.state.sampling_steps = self.steps + self.after
        self.state.textinfo = html.escape(f"OSTAF: {label}, image {done}/{total}")

    def preview(self, step: int, image: Image.Image) -> None:
        self.jobs.set_preview(self.job, image)
        self.state.assign_current_image(image)
        self.log(f"preview at step {step}")

    def log(self, line: str) -> None:
        self.jobs.log(self.job, line)
        print(f"OSTAF: {line}")

    def should_stop(self) -> bool:
        return bool(
            self.job.stop.is_set()
            or getattr(self.state, "interrupted", False)
            or getattr(self.state, "stopping_generation", False)
        )


def run_on_loaded_model(
    jobs: JobManager,
    job: Job,
    request: TrainRequest | ObjectRequest,
    out_dir: Path | str,
    state: Any,
    loaded_model: OpenHost,
) -> dict[str, Any]:
    """``request`` on the model ``loaded_model(request)`` opens (and restores when it
    closes); ``state`` is the WebUI's ``shared.state``. The caller holds the queue lock."""
    request.validate(out_dir)  # refuse bad input before touching the model
    objects = isinstance(request, ObjectRequest)
    total = request.total_steps if objects else request.steps
    reporter = StateReporter.begin(jobs, job, total, state, sweep_units(request))
    with loaded_model(request) as host:
        if objects:
            outcome = run_object_training(host, request, out_dir, reporter)
        else:
            outcome = run_training(host, request, out_dir, reporter)
    if outcome.sweep is not None:
        job.images["sweep"] = outcome.sweep
    return outcome.to_json()
