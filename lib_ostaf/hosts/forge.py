"""stable-diffusion-webui-forge host (Forge 2, and old Forge where noted).

Forge replaces A1111's model objects (research/webui_api.md §8): ``shared.sd_model`` is a
``backend.diffusion_engine`` object with ``forge_objects`` (UNet/CLIP/VAE *patchers*), no
model is loaded at start, the batch loop runs under ``torch.inference_mode()``, layers are
``ForgeOperations.Linear`` (no ``torch.nn.Linear``) and weights may be fp8/nf4/gguf.

* :func:`is_forge` / :func:`forge_generation` — run-time host detection (§8.7).
* The maintained forks (docs/forge.md "Forks") are told apart by what their modules expose,
  never by a version tag or a folder name: :func:`memory_management` (Forge 2 / Neo:
  ``backend``; old Forge, Forge Classic, reForge: ``ldm_patched``), :func:`lora_adapter_class`
  (Neo and reForge merge only ComfyUI-style weight-adapter objects, Forge 2 and Classic take
  ``("lora", …)`` tuples), and the text path (Forge 2 / Neo: text engines; old Forge: A1111's
  embedding database, through :mod:`lib_ostaf.hosts.a1111`).
* :class:`ForgeHost` — training on the loaded model: the *unpatched* UNet
  (``forge_objects_original``, loaded with the memory manager, so no LoRA of a previous
  generation is merged), inference tensors of the engine cloned before autograd, refuses
  quantised storage with a clear message.
* :class:`ForgeApplier` — generation: the plan is remembered after the tags are activated;
  ``process_before_every_sampling`` puts it on a ``clone()`` of ``forge_objects.unet`` with
  ``add_patches`` (identifier includes the content hash, so a retrained file of the same name
  is re-merged); composes with Forge's ``<lora:…>`` (its patches are already on the patcher we
  clone). Object tokens are registered on every text engine (both for SDXL), because Forge
  ignores ``bundle_emb`` keys.

``modules.*`` / ``backend.*`` are imported lazily inside functions; tests pass fakes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lib_ostaf.errors import IncompatibleModelError, InputError, OstafError
from lib_ostaf.files.naming import (
    NATIVE_RESOLUTION,
    UNetInfo,
    inspect_unet,
    is_linear_like,
    module_name_from_kohya,
)
from lib_ostaf.hosts import webui_common as webui
from lib_ostaf.hosts.a1111 import A1111Applier, A1111Host
from lib_ostaf.hosts.webui_common import (
    WebuiText,
    clear_cond_cache,
    embedding_class,
    embedding_db,
    wanted_tokens,
)
from lib_ostaf.method.apply import UNET_PREFIX, merge_terms
from lib_ostaf.method.images import square
from lib_ostaf.method.offsets import WeightPatcher
from lib_ostaf.method.parts import module_parts
from lib_ostaf.method.schedule import StepSchedule
from lib_ostaf.webui.activation import PlannedAdapter
from lib_ostaf.webui.jobs import Job, JobManager
from lib_ostaf.webui.object_job import ObjectRequest
from lib_ostaf.webui.on_loaded_model import run_on_loaded_model
from lib_ostaf.webui.training_job import (
    TrainRequest,
    preserve_module_state,
)

TRAINABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PATCH_PREFIX = "ostaf:"  # add_patches identifiers of ours


# ---------------------------------------------------------------------------------------------
# Detection


def _importable(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def forge_generation() -> int:
    """0: not Forge; 1: old Forge (``ldm_patched``, gradio 3); 2: Forge 2 (``backend``)."""
    if not _importable("modules_forge"):
        return 0
    return 2 if _importable("backend.patcher.base") else 1


def is_forge() -> bool:
    return forge_generation() > 0


MODEL_MANAGEMENT = ("backend.memory_management", "ldm_patched.modules.model_management")
LORA_MERGE = ("backend.patcher.lora", "ldm_patched.modules.lora")  # where patches are merged


def _module(name: str) -> Any | None:
    """``name`` if the host has it (already imported, or importable), else None."""
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    if not _importable(name):
        return None
    try:
        return importlib.import_module(name)
    except Exception:  # a host module that fails to import is a module the host lacks
        return None


def memory_management() -> Any:
    """The host's model manager: Forge 2 / Neo ``backend.memory_management``; old Forge,
    Forge Classic and reForge ``ldm_patched.modules.model_management`` (no ``backend``).
    Chosen by what is importable and has ``load_model_gpu``."""
    for name in MODEL_MANAGEMENT:
        mod = _module(name)
        if mod is not None and callable(getattr(mod, "load_model_gpu", None)):
            return mod
    raise IncompatibleModelError(
        "this Forge has neither backend.memory_management nor "
        "ldm_patched.modules.model_management; OSTAF cannot load its model"
    )


def lora_adapter_class() -> type | None:
    """The host's LoRA weight-adapter class when its LoRA merge wants adapter objects
    (Forge Neo ``backend.patcher.lora``, reForge ``ldm_patched.modules.lora``: both import
    ComfyUI's ``weight_adapter`` package and reject ``("lora", …)`` tuples); None when the
    merge takes tuples (Forge 2, Forge Classic: their merge modules have no ``weight_adapter``).
    The first merge module the host has decides."""
    for name in LORA_MERGE:
        mod = _module(name)
        if mod is None:
            continue
        cls = getattr(getattr(mod, "weight_adapter", None), "LoRAAdapter", None)
        return cls if isinstance(cls, type) else None
    return None


def lora_patch(up: torch.Tensor, down: torch.Tensor, alpha: float, adapter: type | None) -> Any:
    """One layer's patch value, merged by every host as ``strength · alpha/rank · up @ down``:
    a ``LoRAAdapter(loaded_keys, (up, down, alpha, mid, dora_scale, reshape))`` where the
    host wants weight-adapter objects, else Forge's ``("lora", (up, down, alpha, mid, dora))``
    (old Forge reads the first four)."""
    if adapter is not None:
        return adapter(set(), (up, down, alpha, None, None, None))
    return ("lora", (up, down, alpha, None, None))


def model_family(sd_model: Any) -> str | None:
    """sd1/sd2/sdxl from Forge's legacy flags; None for anything else (Flux, SD3, …)."""
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    if getattr(sd_model, "is_sd1", False):
        return "sd1"
    return None


def text_engines(sd_model: Any) -> list[Any]:
    """Forge's text-processing engines: SD1/SD2 one, SDXL CLIP-L then CLIP-G."""
    one = getattr(sd_model, "text_processing_engine", None)
    if one is not None:
        return [one]
    return [
        e
        for e in (
            getattr(sd_model, "text_processing_engine_l", None),
            getattr(sd_model, "text_processing_engine_g", None),
        )
        if e is not None
    ]


# ---------------------------------------------------------------------------------------------
# Training host


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor from one made under inference mode (autograd refuses those)."""
    with torch.inference_mode(False):
        return t.clone() if t.is_inference() else t


def _deinference_params(module: torch.nn.Module) -> int:
    """Replace inference-tensor parameters/buffers by normal copies (Forge loads and merges
    weights under ``inference_mode``; backward needs to save them). Returns how many."""
    n = 0
    with torch.inference_mode(False), torch.no_grad():
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                    n += 1
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()
                    n += 1
    return n


def _clone_input_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> Any:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        return (x.clone(), *args[1:])
    return None


def autograd_safe_hooks(unet: torch.nn.Module) -> list[Any]:
    """Forge's ``BasicTransformerBlock`` does ``x += attn(norm(x))`` in place (fine under
    inference mode), which breaks backward: ``norm1``/``norm2`` saved ``x`` for their own
    gradient. Pre-hooks hand those norms a copy while autograd records; returns handles."""
    return [
        m.register_forward_pre_hook(_clone_input_hook)
        for name, m in unet.named_modules()
        if "transformer_blocks." in name and name.rsplit(".", 1)[-1] in ("norm1", "norm2")
    ]


def _check_trainable_storage(kmodel: Any, unet: torch.nn.Module) -> None:
    storage = getattr(kmodel, "storage_dtype", None)
    weights = {p.dtype for p in unet.parameters()}
    if (storage is not None and storage not in TRAINABLE_DTYPES) or not weights <= set(
        TRAINABLE_DTYPES
    ):
        shown = storage if storage is not None else sorted(map(str, weights))
        raise IncompatibleModelError(
            f"the UNet weights are stored as {shown} (fp8/nf4/gguf); training needs "
            "fp16/bf16/fp32 weights: set 'Diffusion in Low Bits' to Automatic or float16 "
            "(generation with an adapter works in any storage)"
        )


def _prediction_type(sd_model: Any, predictor: Any) -> str:
    v_param = getattr(sd_model, "parameterization", "eps") == "v"
    pred = getattr(predictor, "prediction_type", "v_prediction" if v_param else "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        raise IncompatibleModelError(f"unsupported prediction type {pred!r} (eps or v only)")
    return pred


def _mode(posterior: Any) -> torch.Tensor:
    return posterior.mode() if hasattr(posterior, "mode") else posterior.mean


class ForgeHost:
    """The loaded Forge model as a :class:`~lib_ostaf.method.host.Host`."""

    def __init__(
        self,
        sd_model: Any,
        *,
        resolution: int | None = None,
        device: torch.device | str | None = None,
        load: Callable[[Any], None] | None = None,
        clip_skip: int | None = None,
    ) -> None:
        objects = getattr(sd_model, "forge_objects_original", None) or getattr(
            sd_model, "forge_objects", None
        )
        patcher = getattr(objects, "unet", None)
        kmodel = getattr(patcher, "model", None)
        unet = getattr(kmodel, "diffusion_model", None)
        family = model_family(sd_model)
        if unet is None or family is None:
            raise IncompatibleModelError(
                "the loaded model is not an SD1/SD2/SDXL UNet model (Forge also runs Flux/SD3); "
                "OSTAF trains SD1, SD2 and SDXL checkpoints"
            )
        if int(getattr(unet, "in_channels", 4) or 4) != 4:
            raise IncompatibleModelError(
                "the loaded checkpoint is an inpainting/instruct model; train on a regular "
                "SD1/SD2/SDXL checkpoint (the adapter then works with inpainting too)"
            )
        _check_trainable_storage(kmodel, unet)
        predictor = getattr(kmodel, "predictor", None)  # old Forge: none; A1111's flag instead
        pred = _prediction_type(sd_model, predictor)
        self.sd_model = sd_model
        self.patcher = patcher
        self.unet: torch.nn.Module = unet
        self.family = family
        self.info: UNetInfo = inspect_unet(unet)
        self.prediction_type = pred
        acp = getattr(predictor, "alphas_cumprod", None)
        if acp is None:
            acp = sd_model.alphas_cumprod
        self.alphas_cumprod = torch.as_tensor(_plain(acp)).detach().float().cpu()
        first = next(unet.parameters())
        self.device = torch.device(device) if device is not None else first.device
        compute = getattr(kmodel, "computation_dtype", None)
        self.dtype = compute if compute in TRAINABLE_DTYPES else first.dtype
        self.resolution = int(resolution or NATIVE_RESOLUTION[family])
        self.latent_channels = 4
        self.latent_scale = 8
        self._text: tuple[WebuiText, ...] | None = None
        self._legacy: A1111Host | None = None
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.base_model_name = str(getattr(info, "name_for_extra", "") or getattr(info, "name", ""))
        self._load = load or (lambda patcher: None)
        self._hooks: list[Any] = []
        self.clip_skip = clip_skip  # the user's "Clip skip" setting; None: the engines' own

    @property
    def text_encoders(self) -> tuple[WebuiText, ...]:
        """Object implantation: Forge's text engines (SDXL: CLIP-L, CLIP-G); on old Forge
        (Classic, reForge) A1111's hijacked embedders."""
        if self._text is None:
            legacy = self.legacy_text()
            if legacy is not None:
                self._text = tuple(legacy.text_encoders)
            else:
                self._text = tuple(ForgeText(e) for e in text_engines(self.sd_model))
        return self._text

    def legacy_text(self) -> A1111Host | None:
        """Old Forge (Forge Classic, reForge) has no text engines: prompts go through A1111's
        hijacked CLIP embedders and ``sd_hijack``'s embedding database, so A1111's text path
        serves (an :class:`A1111Host` over the same model, for the text side only). None on
        Forge 2 / Neo, or where neither exists."""
        if text_engines(self.sd_model) or embedding_db() is None:
            return None
        if self._legacy is None:
            self._legacy = A1111Host(self.sd_model, resolution=self.resolution, device=self.device)
        return self._legacy

    @classmethod
    def from_webui(cls, *, resolution: int | None = None) -> ForgeHost:
        """Load the selected checkpoint if Forge has not yet (nothing is loaded at start) and
        put its *unpatched* UNet on the device. The caller holds ``queue_lock``."""
        from modules import sd_models, shared

        mm = memory_management()
        sd_model = shared.sd_model
        reload = getattr(sd_models, "forge_model_reload", None)  # old Forge loads at start
        if getattr(sd_model, "forge_objects", None) is None and callable(reload):
            reload()
            sd_model = shared.sd_model
        if getattr(sd_model, "forge_objects", None) is None:
            raise InputError("no model is loaded; pick a checkpoint first")

        def load(patcher: Any) -> None:
            mm.load_model_gpu(patcher)

        skip = getattr(shared.opts, "CLIP_stop_at_last_layers", None)
        host = cls(
            sd_model,
            resolution=resolution,
            device=mm.get_torch_device(),
            load=load,
            clip_skip=None if skip is None else int(skip),
        )
        host.prepare()
        return host

    def prepare(self) -> None:
        """Unpatched weights on the device, as normal (non-inference) tensors."""
        self._load(self.patcher)  # LoraLoader.refresh: restores weights merged by a generation
        refresh = getattr(self.patcher, "refresh_loras", None)
        if callable(refresh) and not getattr(self.patcher, "lora_patches", None):
            refresh()
        _deinference_params(self.unet)
        # Forge sets the engines' clip skip from the setting before each generation's
        # conditioning (processing.get_conds_with_caching); until then they keep the last
        # generation's, or their built-in default on a fresh server (SD1: 1, while Neo's
        # setting defaults to 2). Training encodes its prompt as generation will.
        set_clip_skip = getattr(self.sd_model, "set_clip_skip", None)
        if self.clip_skip is not None and callable(set_clip_skip):
            set_clip_skip(self.clip_skip)
        if not self._hooks:
            self._hooks = autograd_safe_hooks(self.unet)

    def close(self) -> None:
        """Remove the training-only hooks of :meth:`prepare`."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # -- Host protocol --------------------------------------------------------------------
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        image = square(image, self.resolution)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        x = x.permute(2, 0, 1)[None]
        vae = self.sd_model.forge_objects.vae
        model = getattr(vae, "first_stage_model", None)
        encode = getattr(model, "encode", None)
        with torch.inference_mode():
            if encode is not None and "regulation" in inspect.signature(encode).parameters:
                if getattr(vae, "patcher", None) is not None:
                    self._load(vae.patcher)
                dev = getattr(vae, "device", self.device)
                dtype = getattr(vae, "vae_dtype", torch.float32)
                z = encode(x.to(dev, dtype), regulation=_mode).float()  # mode: deterministic
                z = model.process_in(z) if hasattr(model, "process_in") else z
            else:  # Forge's encode_first_stage samples the posterior: fix the noise
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    z = self.sd_model.encode_first_stage(x)
        return _plain(z).to(self.device, self.dtype)

    def encode_prompt(self, prompt: str, embeddings: Any = None) -> Any:
        """``get_learned_conditioning`` (``@inference_mode`` in Forge). With ``embeddings``
        the text engines are called directly, outside inference mode, with the new tokens
        registered in their databases for this call: differentiable in the vectors."""
        if embeddings:
            legacy = self.legacy_text()
            if legacy is None:
                return self._encode_live(prompt, embeddings)
            self.prepare_text()
            with torch.inference_mode(False):
                return legacy.encode_prompt(prompt, embeddings)
        with torch.no_grad():  # old Forge's (A1111's) is not decorated: no graph wanted
            cond = self.sd_model.get_learned_conditioning([prompt])
        if isinstance(cond, dict):  # SDXL: {"crossattn", "vector"}
            return {k: _plain(v).detach() for k, v in cond.items()}
        return _plain(cond).detach()

    def prepare_text(self) -> None:
        """Text encoders on the device as normal tensors (object implantation): Forge loads
        them under ``inference_mode``, where autograd can neither save nor flag them."""
        clip = getattr(getattr(self.sd_model, "forge_objects", None), "clip", None)
        if getattr(clip, "patcher", None) is not None:
            self._load(clip.patcher)
        for text in self.text_encoders:
            _deinference_params(text.model)

    def _encode_live(self, prompt: str, embeddings: Any) -> Any:
        engines = [t.engine for t in self.text_encoders]
        self.prepare_text()  # again: a reload may swap the parameters (cheap when none)
        before = [{t: e.embeddings.word_embeddings.get(t) for t in embeddings} for e in engines]
        try:
            for token, vectors in embeddings.items():
                emb = make_embedding_live(token, vectors, self.family)
                for engine in engines:
                    engine.embeddings.register_embedding_by_name(emb, token)
            with torch.inference_mode(False), torch.enable_grad():
                if self.family != "sdxl":
                    return engines[0]([prompt])
                base = self.sd_model.get_learned_conditioning([prompt])  # the size embedding
                cond_l = engines[0]([prompt])
                cond_g, pooled = engines[1]([prompt])
                tail = _plain(base["vector"])[:, pooled.shape[-1] :].to(pooled)
                return {
                    "crossattn": torch.cat([cond_l, cond_g], 2),
                    "vector": torch.cat([pooled, tail], 1),
                }
        finally:
            for engine, saved in zip(engines, before, strict=True):
                for token, old in saved.items():
                    engine.embeddings.register_embedding_by_name(None, token)
                    if old is not None:
                        engine.embeddings.register_embedding_by_name(old, token)

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        self._load(self.patcher)  # the text encoder / VAE may have pushed it off the device
        _deinference_params(self.unet)  # a reload swaps parameters again (cheap when none)
        batch = x_t.shape[0]
        extra: dict[str, torch.Tensor] = {}
        if isinstance(cond, dict):
            context = cond["crossattn"]
            extra["y"] = cond["vector"].expand(batch, -1).to(self.dtype)
        else:
            context = cond
        context = context.expand(batch, *context.shape[1:]).to(self.dtype)
        return self.unet(
            x_t.to(self.dtype), t.float(), context=context, transformer_options={}, **extra
        )

    def decode_latents(self, latents: torch.Tensor) -> Image.Image:
        with torch.no_grad():
            x = self.sd_model.decode_first_stage(latents.to(self.device))
        x = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu()
        return Image.fromarray(x.numpy())


# ---------------------------------------------------------------------------------------------
# Generation


def patch_id(planned: PlannedAdapter) -> str:
    """``add_patches`` identifier: Forge re-merges only when identifiers change (§8.3), so
    it names the file's content (path, size, mtime, hash), not just its name."""
    return PATCH_PREFIX + "|".join(str(x) for x in (planned.name, *planned.identity))


def add_patches(patcher: Any, filename: str, patches: Mapping[Any, Any], strength: float) -> set:
    """Forge 2 / Neo: ``filename`` keyword (identifier of the LoRA merge); old Forge, Classic,
    reForge: positional, no filename. Neo files a patch under its LoRA loader only when
    ``online_mode`` is given too (as its builtin LoRA does); Forge 2 defaults it to False."""
    params = inspect.signature(patcher.add_patches).parameters
    if "filename" in params:
        extra = {"online_mode": False} if "online_mode" in params else {}
        accepted = patcher.add_patches(
            filename=filename, patches=patches, strength_patch=strength, **extra
        )
        return set(accepted or ())
    return set(patcher.add_patches(dict(patches), strength) or ())


class ForgeText(WebuiText):
    """One Forge text engine: its tokenizer, its token table."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.model = engine.text_encoder
        self.key = str(getattr(engine, "embedding_key", "clip_l"))
        self.width = int(self._table().shape[-1])

    def _table(self) -> torch.Tensor:
        emb = self.model.transformer.text_model.embeddings.token_embedding
        return getattr(emb, "wrapped", emb).weight

    def ids(self, text: str) -> list[int]:
        return list(self.engine.tokenize([text])[0])

    def rows(self, text: str) -> torch.Tensor:
        table = self._table()
        return _plain(table[torch.tensor(self.ids(text), device=table.device, dtype=torch.long)])


def make_embedding_live(token: str, vectors: Sequence[torch.Tensor], family: str) -> Any:
    """A Forge ``Embedding`` around the live (trainable) vectors."""
    cls = embedding_class("backend.text_processing.textual_inversion")
    return webui.make_embedding(token, vectors, family, cls, live=True)


def make_embedding(token: str, vectors: Sequence[torch.Tensor], family: str) -> Any:
    """A Forge ``Embedding`` (detached CPU copies; each engine picks its SDXL key)."""
    cls = embedding_class("backend.text_processing.textual_inversion")
    return webui.make_embedding(token, vectors, family, cls)


class ForgeApplier:
    """Puts a :class:`~lib_ostaf.webui.activation.Plan`'s adapters on Forge's patchers."""

    def __init__(self) -> None:
        self.mode = "forge"
        self.pending: list[PlannedAdapter] = []
        self._patches: dict[tuple[object, ...], dict[str, Any]] = {}  # identity → patches
        self._info: tuple[int, UNetInfo] | None = None
        self._tokens: dict[str, tuple[object, ...]] = {}  # registered token → identity key
        self._legacy = A1111Applier()  # old Forge: tokens through A1111's embedding database
        self._schedule: StepSchedule = StepSchedule([], [])
        self._live: WeightPatcher | None = None  # scheduled adapters, on the sampling model
        self._live_unet: torch.nn.Module | None = None

    # -- after the tags are activated (text side) -----------------------------------------
    def apply(self, sd_model: Any, adapters: Sequence[PlannedAdapter]) -> list[str]:
        """Remember the UNet side for :meth:`patch_unet`; register object tokens now (before
        the conditionings are computed). Returns messages for skipped parts."""
        self.finish()
        on = [a for a in adapters if any(lam != 0 for _, lam in a.merges())]
        self.pending = [a for a in on if not a.dials.scheduled]
        timed = [a for a in on if a.dials.scheduled]
        self._schedule = StepSchedule(timed, [(a.dials.start, a.dials.end) for a in timed])
        return self.register_embeddings(sd_model, adapters)

    # -- on_cfg_denoiser: the step schedule ----------------------------------------------
    def on_step(self, sd_model: Any, step: int, total: int) -> list[str]:
        """Scheduled adapters are merged into the sampling model's weights directly (Forge's
        patches load once per pass), only at boundaries and only their layers; the
        weights are put back in :meth:`finish` (after the batch, and before any new plan)."""
        if not self._schedule.scheduled:
            return []
        adapters = self._schedule.at(step, total)
        if adapters is None:
            return []
        unet = sd_model.forge_objects.unet.model.diffusion_model
        if self._live is None or self._live_unet is not unet:
            self.finish()
            linear = {n: m for n, m in unet.named_modules() if is_linear_like(m)}
            self._live, self._live_unet = WeightPatcher(linear), unet
        info = self._unet_info(unet)
        terms, messages = [], []
        for planned in adapters:
            try:
                weights = dict(planned.dials.parts)
                terms += merge_terms(planned.adapter, unet, info, planned.weight, weights)
            except OstafError as e:
                messages.append(f"OSTAF: {planned.name}: {e}; skipped.")
        with torch.inference_mode():  # Forge's weights are inference tensors
            self._live.apply(terms)
        return messages

    def _unet_info(self, unet: torch.nn.Module) -> UNetInfo:
        """The UNet's layout, inspected once per model (not at every step boundary)."""
        if self._info is None or self._info[0] != id(unet):
            self._info = (id(unet), inspect_unet(unet))
        return self._info[1]

    def finish(self) -> None:
        """Put back the weights the step schedule changed (bit-exact)."""
        if self._live is not None:
            with torch.inference_mode():
                self._live.restore()

    def register_embeddings(self, sd_model: Any, adapters: Sequence[PlannedAdapter]) -> list[str]:
        engines = text_engines(sd_model)
        if not engines and embedding_db() is not None:  # Forge Classic, reForge
            return self._legacy.register_embeddings(sd_model, adapters)
        family = model_family(sd_model) or "sd1"
        wanted, messages = wanted_tokens(
            adapters, family, lambda: tuple(ForgeText(e) for e in engines)
        )
        dbs = tuple(id(getattr(e, "embeddings", None)) for e in engines)
        changed = False
        for token in [t for t in self._tokens if t not in wanted]:
            for engine in engines:
                engine.embeddings.register_embedding_by_name(None, token)
            del self._tokens[token]
            changed = True
        if wanted and not engines:
            messages.append("OSTAF: this Forge model has no text engine; object tokens skipped.")
            return messages
        for token, (planned, vectors) in wanted.items():
            key = (*planned.identity, planned.token_weight, dbs)  # a learned placeholder: its λ
            if self._tokens.get(token) == key:
                continue
            try:
                emb = make_embedding(token, vectors, family)
            except OstafError as e:
                messages.append(f"OSTAF: {planned.name}: {e}; token {token} skipped.")
                continue
            for engine in engines:
                engine.embeddings.register_embedding(emb)
            self._tokens[token] = key
            changed = True
        if changed:
            clear_cond_cache()  # same prompt text, different vectors
        return messages

    # -- process_before_every_sampling (UNet side) ----------------------------------------
    def patch_unet(self, p: Any) -> list[str]:
        """``forge_objects.unet`` → a clone with our patches. Forge resets ``forge_objects``
        before each call, and a repeated call only overwrites our identifiers: idempotent."""
        if not self.pending:
            return []
        objects = p.sd_model.forge_objects
        unet = objects.unet.clone()
        messages: list[str] = []
        for planned in self.pending:
            try:
                patches = self.unet_patches(planned, unet)
            except OstafError as e:
                messages.append(f"OSTAF: {planned.name}: {e}; skipped.")
                continue
            parts = module_parts(planned.adapter)
            for part, lam in planned.merges():
                if lam == 0:
                    continue
                chosen = {
                    name: value
                    for key, (name, value) in patches.items()
                    if part is None or parts.get(key, "") == part
                }
                ident = patch_id(planned) + ("" if part is None else f"#{part or 'rest'}")
                accepted = add_patches(unet, ident, chosen, float(lam))
                if len(accepted) < len(chosen):
                    messages.append(
                        f"OSTAF: {planned.name}: only {len(accepted)} of {len(chosen)} layers "
                        "fit the loaded model."
                    )
        objects.unet = unet
        return messages

    def unet_patches(self, planned: PlannedAdapter, patcher: Any) -> dict[str, tuple[str, Any]]:
        """``{kohya key: ("diffusion_model.<ldm path>.weight", <LoRA patch>)}``
        (:func:`lora_patch`: a tuple, or the host's weight-adapter object): the host merges
        ``strength · alpha/rank · up @ down`` = λ·ΔW (§8.3)."""
        cached = self._patches.get(planned.identity)
        if cached is not None:
            return cached
        unet = patcher.model.diffusion_model
        info = self._unet_info(unet)
        family = planned.adapter.family
        if family is not None and family != info.family:
            raise IncompatibleModelError(f"made for {family}, the loaded model is {info.family}")
        adapter = lora_adapter_class()
        patches: dict[str, tuple[str, Any]] = {}
        for key, module in planned.adapter.modules.items():
            if not key.startswith(UNET_PREFIX):
                continue
            name = module_name_from_kohya(key, info)
            value = lora_patch(module.up, module.down, float(module.alpha), adapter)
            patches[key] = (f"diffusion_model.{name}.weight", value)
        if not patches:
            raise IncompatibleModelError("no UNet layers to apply")
        for old in [k for k in self._patches if k[0] == planned.identity[0]]:
            del self._patches[old]  # the same file, older content
        self._patches[planned.identity] = patches
        return patches

    def reset(self, sd_model: Any = None) -> None:
        """Forget the plan and unregister our tokens (patches die with Forge's reset)."""
        self.finish()
        self._schedule = StepSchedule([], [])
        self.pending = []
        if sd_model is not None and self._tokens:
            for engine in text_engines(sd_model):
                for token in self._tokens:
                    engine.embeddings.register_embedding_by_name(None, token)
        self._tokens.clear()
        if sd_model is not None and embedding_db() is not None:
            self._legacy.register_embeddings(sd_model, [])  # removes the tokens it registered

    def clear_for_training(self, sd_model: Any) -> None:
        self.finish()
        self.pending = []

    def forget(self) -> None:
        """After a checkpoint change: cached patches and token registrations are stale."""
        self._patches.clear()
        self._info = None
        self._tokens.clear()


# ---------------------------------------------------------------------------------------------
# Training inside Forge


def train_on_loaded_model(
    jobs: JobManager,
    job: Job,
    request: TrainRequest | ObjectRequest,
    out_dir: Path | str,
    applier: Any,
) -> dict[str, Any]:
    """Train (attribute or objects) on Forge's loaded model (loaded here if needed); the
    caller holds the queue lock. The UNet is trained unpatched; offsets live in forward
    hooks only, object tokens in the engines' databases during each call only."""
    from modules import shared

    @contextlib.contextmanager
    def loaded_model(request: TrainRequest | ObjectRequest) -> Iterator[ForgeHost]:
        host = ForgeHost.from_webui(resolution=request.resolution or None)
        applier.clear_for_training(host.sd_model)
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(preserve_module_state(host.unet))
                if isinstance(request, ObjectRequest):
                    host.prepare_text()  # before the flags are saved: restored on these
                    for text in host.text_encoders:
                        stack.enter_context(preserve_module_state(text.model))
                yield host
        finally:
            host.close()
            with contextlib.suppress(Exception):
                memory_management().soft_empty_cache()
        clear_cond_cache()  # after a finished run only, as before

    return run_on_loaded_model(jobs, job, request, out_dir, shared.state, loaded_model)


def webui_state() -> Any:
    """The process-wide state of :mod:`lib_ostaf.hosts.a1111`, with Forge's applier."""
    from lib_ostaf.hosts.a1111 import webui_state as shared_state

    state = shared_state()
    if not isinstance(state.applier, ForgeApplier):
        state.applier = ForgeApplier()
    return state
