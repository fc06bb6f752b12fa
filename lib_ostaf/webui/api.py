"""REST API of the extension, host-agnostic: request models and handlers.

The host glue wires the handlers to FastAPI routes (with the WebUI's ``--api-auth``) and
supplies ``runner(job, request)``, which takes the WebUI's queue lock and trains on its
loaded model. Models work with pydantic v1 (A1111: fastapi 0.94) and v2 (Forge).
Handlers raise :class:`ApiError` with an HTTP status; nothing outside the adapters folder
is ever read or written (names go through the registry).
"""

from __future__ import annotations

import base64
import binascii
import io
import secrets
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageOps
from pydantic import BaseModel, Field

from lib_ostaf.errors import OstafError
from lib_ostaf.method.images import to_rgb
from lib_ostaf.method.objects import ObjectConfig
from lib_ostaf.method.train import AttributeConfig
from lib_ostaf.webui.jobs import Job, JobBusy, JobManager
from lib_ostaf.webui.object_job import MAX_OBJECTS, ObjectRequest
from lib_ostaf.webui.registry import AdapterRegistry
from lib_ostaf.webui.run_settings import RUN
from lib_ostaf.webui.training_job import MAX_STEPS, TrainRequest

A, OBJ = AttributeConfig, ObjectConfig  # each method's settings: the defaults' one home

PREFIX = "/ostaf/v1"
# Routes that train, write files or stop a job: mounted only when the WebUI serves its own
# API (--api / --nowebui), as A1111 does for /sdapi; the read-only ones always are.
WRITE_ROUTES = ("/train", "/implant", "/interrupt")
MAX_IMAGE_BYTES = 32 << 20
MAX_IMAGE_PIXELS = 4096 * 4096


class ApiError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class RunBody(BaseModel):
    """Settings every training request shares (size, files, previews, sweep): RUN's."""

    resolution: int = Field(
        RUN.resolution, ge=0, le=4096, description="0 = the model's native size"
    )
    overwrite: bool = RUN.overwrite
    save_state: bool = Field(
        RUN.save_state,
        description="also write <name>.ostaf-state (hypernetwork parameters; not read back)",
    )
    preview_steps: int = Field(RUN.preview_steps, ge=1, le=150)
    preview_size: int = Field(RUN.preview_size, ge=0, le=4096)
    guidance: float = RUN.guidance
    sweep: list[float] = Field(default_factory=lambda: list(RUN.sweep))


class TrainBody(RunBody):
    """POST /ostaf/v1/train. ``image``: base64 PNG/JPEG/WebP (a data URL is fine). Every
    default is :class:`~lib_ostaf.method.train.AttributeConfig`'s."""

    image: str = Field(..., description="reference image, base64 (data URL accepted)")
    name: str = Field(..., description="output adapter name (file stem)")
    attribute: str = Field(
        A.attribute, description="appearance | shape | style | shape+appearance | shape+style"
    )
    token: str = A.token
    prompt: str = A.prompt
    steps: int = Field(A.steps, ge=1, le=MAX_STEPS)
    rank: int = Field(A.rank, ge=1, le=256)
    lr: float | None = Field(A.lr, ge=0, lt=1, description="0/null: by attribute")
    seed: int = A.seed
    network: str = A.network
    include_mid: bool = A.include_mid
    attn: list[str] | None = None  # None: AttributeConfig's
    proj: list[str] | None = None
    blocks: list[str] | None = A.blocks
    n_views: int = Field(A.n_views, ge=1, le=64)
    default_lambda: float = A.default_lambda
    preview_every: int = Field(A.preview_every, ge=0)
    precision: str = Field(A.precision, description="auto | fp32 | bf16 | fp16")
    gradient_checkpointing: str = Field(A.gradient_checkpointing, description="auto | on | off")


class ObjectBody(BaseModel):
    """One object of POST /ostaf/v1/implant: a new token, its class word, and a mask (base64
    PNG, white = the object) — give a mask for every object or for none (automatic)."""

    token: str = Field(..., description="new word, e.g. <mug1>")
    class_name: str = Field(..., description="what it is, e.g. mug")
    mask: str | None = Field(None, description="base64 mask image; omit for automatic masks")


class ImplantBody(RunBody):
    """POST /ostaf/v1/implant: object implantation from one image. Every default is
    :class:`~lib_ostaf.method.objects.ObjectConfig`'s."""

    image: str = Field(..., description="image with the object(s), base64 (data URL accepted)")
    name: str = Field(..., description="output adapter name (file stem)")
    objects: list[ObjectBody] = Field(..., description=f"1…{MAX_OBJECTS} objects")
    steps: int = Field(OBJ.steps, ge=1, le=MAX_STEPS)
    embedding_steps: int = Field(OBJ.embedding_steps, ge=0, le=MAX_STEPS)
    rank: int = Field(OBJ.rank, ge=1, le=256)
    lr: float = Field(OBJ.lr, gt=0, lt=1)
    embedding_lr: float = Field(OBJ.embedding_lr, ge=0, lt=1)
    class_weight: float = Field(OBJ.class_weight, ge=0)
    background_weight: float = Field(OBJ.background_weight, ge=0, le=1)
    seed: int = OBJ.seed
    default_lambda: float = OBJ.default_lambda
    preview_every: int = Field(OBJ.preview_every, ge=0)
    precision: str = Field(OBJ.precision, description="auto | fp32 | bf16 | fp16")
    gradient_checkpointing: str = Field(OBJ.gradient_checkpointing, description="auto | on | off")


def model_fields(model: BaseModel) -> dict[str, Any]:
    dump = getattr(model, "model_dump", None)  # pydantic v2
    return dump() if dump is not None else model.dict()


def decode_image(data: str, *, mask: bool = False) -> Image.Image:
    """Base64 (or data URL) → image turned upright (EXIF) and, unless ``mask``, 8-bit RGB
    with transparency on white (as from a file); a mask keeps its mode (alpha = object).
    ApiError 422 for anything else."""
    if not isinstance(data, str) or not data:
        raise ApiError(422, "image: base64 image data is required")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ApiError(413, f"image: larger than {MAX_IMAGE_BYTES >> 20} MiB")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "image: not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ApiError(413, f"image: {im.width}×{im.height} is too large")
            im.load()
            upright = ImageOps.exif_transpose(im) or im
            return upright.copy() if mask else to_rgb(upright)
    except ApiError:
        raise
    except Exception:
        raise ApiError(422, "image: not a readable PNG/JPEG/WebP image") from None


def api_enabled(cmd_opts: Any) -> bool:
    """Whether the WebUI serves its API: ``--api``, or ``--nowebui`` (API only)."""
    return bool(getattr(cmd_opts, "api", False) or getattr(cmd_opts, "nowebui", False))


def check_basic_auth(api_auth: str | None, username: str, password: str) -> bool:
    """A1111's ``--api-auth user:pass[,user2:pass2]`` check (constant-time compare)."""
    if not api_auth:
        return True
    for pair in api_auth.strip().split(","):
        user, sep, pwd = pair.strip().partition(":")
        if (
            sep
            and secrets.compare_digest(user, username or "")
            and secrets.compare_digest(pwd, password or "")
        ):
            return True
    return False


Runner = Callable[[Job, TrainRequest | ObjectRequest], dict[str, Any]]


class OstafApi:
    """The handlers; ``runner`` trains (host glue), ``jobs`` is shared with the UI tab."""

    def __init__(self, registry: AdapterRegistry, jobs: JobManager, runner: Runner) -> None:
        self.registry, self.jobs, self.runner = registry, jobs, runner

    def list_adapters(self) -> dict[str, Any]:
        return {
            "folder": str(self.registry.root),
            "adapters": [e.to_json() for e in self.registry.entries()],
        }

    def adapter(self, name: str) -> dict[str, Any]:
        try:
            path = self.registry.path_for(name)
        except OstafError as e:
            raise ApiError(400, str(e)) from None
        if not path.is_file():
            raise ApiError(404, f"adapter {name!r} not found")
        entry = self.registry.entry(name)
        return entry.to_json() | {"metadata": entry.metadata}

    def _check_name(self, name: str) -> None:
        """400 for a name that is not a safe file stem inside the adapters folder."""
        try:
            self.registry.path_for(name)
        except OstafError as e:
            raise ApiError(400, str(e)) from None

    def train(self, body: TrainBody) -> dict[str, Any]:
        self._check_name(body.name)
        fields = model_fields(body)
        fields["image"] = decode_image(body.image)
        for key in ("attn", "proj"):
            if fields[key] is None:
                fields.pop(key)
            else:
                fields[key] = tuple(fields[key])
        fields["blocks"] = tuple(fields["blocks"]) if fields["blocks"] else None
        return self._start("attribute", TrainRequest, fields)

    def implant(self, body: ImplantBody) -> dict[str, Any]:
        self._check_name(body.name)
        fields = model_fields(body)
        fields["image"] = decode_image(body.image)
        objects = fields.pop("objects")
        if not 1 <= len(objects) <= MAX_OBJECTS:  # pydantic v1 ignores min/max_length
            raise ApiError(422, f"objects: give 1…{MAX_OBJECTS} objects")
        fields["tokens"] = [o["token"] for o in objects]
        fields["classes"] = [o["class_name"] for o in objects]
        fields["masks"] = [
            decode_image(o["mask"], mask=True) if o["mask"] else None for o in objects
        ]
        return self._start("objects", ObjectRequest, fields)

    def _start(
        self, kind: str, request_type: type[TrainRequest | ObjectRequest], fields: dict[str, Any]
    ) -> dict[str, Any]:
        """The body's fields as a request, validated (422), started unless busy (409)."""
        fields["sweep"] = tuple(fields["sweep"])
        try:
            request = request_type.from_dict(fields)
            request.validate(self.registry.root)
        except OstafError as e:
            raise ApiError(422, str(e)) from None
        try:
            job = self.jobs.begin(kind)
        except JobBusy as e:
            raise ApiError(409, str(e)) from None
        self.jobs.run_in_thread(job, lambda j: self.runner(j, request))
        return {"job_id": job.id, "status": job.status}

    def progress(self, job_id: str | None = None, preview: bool = False) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, "no such training job" if job_id else "no training job yet")
        return job.to_json(with_preview=preview)

    def interrupt(self, job_id: str | None = None) -> dict[str, Any]:
        """Stop our job through its own stop flag (checked every step). The WebUI's global
        interrupt is never called: it would stop whatever generation is running."""
        job = self.jobs.interrupt(job_id)
        if job is None:
            raise ApiError(404, "no such training job" if job_id else "no training job yet")
        return job.to_json()
