"""Stand-ins for stable-diffusion-webui-forge 2 (research/webui_api.md §8), logic only.

* :class:`ForgeLinear` — like ``ForgeOperations.Linear``: a plain ``nn.Module`` (not an
  ``nn.Linear``) with ``in_features``/``out_features``/``weight``/``bias``.
* :class:`FakeModelPatcher` — Forge's ``ModelPatcher`` semantics that matter here: ``clone``
  shares the model and its single lora loader, copies ``lora_patches``; keyword-only
  ``add_patches(filename=…)`` keyed by ``(filename, strength_patch, strength_model, online)``,
  returning accepted keys; :class:`FakeLoraLoader` merges on ``refresh`` only when the list
  of identifiers changes, restoring backups first and *swapping* parameter objects, under
  ``inference_mode`` (as Forge does).
* :class:`FakeForgeModel` — a ``StableDiffusion`` engine around the tiny ldm UNet:
  ``forge_objects`` / ``_original`` / ``_after_applying_lora``, a text engine with an
  ``EmbeddingDatabase``, ``@inference_mode`` conditioning and first-stage helpers.

The maintained forks, each written from its own source (read, not copied):

* Forge Neo (``backend/patcher/base.py``, ``backend/patcher/lora.py``): :class:`FakeNeoModelPatcher`
  files patches under its LoRA loader only when ``filename`` *and* ``online_mode`` are given,
  and its merge (:func:`neo_merge`) takes ComfyUI weight-adapter objects
  (:class:`FakeLoRAAdapter`) and raises ``ValueError('… of type "lora" is not recognized')``
  for Forge 2's ``("lora", …)`` tuples; :func:`fake_neo_modules` installs
  ``backend.patcher.lora`` (which imports ``weight_adapter``).
* Forge Classic and reForge (``ldm_patched``, no ``backend``): :class:`FakeLdmModelPatcher`
  (positional ``add_patches``, ``patch_model`` / ``unpatch_model`` with backups, loaded by
  ``ldm_patched.modules.model_management.load_model_gpu``); Classic's merge takes
  ``("lora", (up, down, alpha, mid))`` tuples, reForge's only weight-adapter objects (a tuple
  logs "patch type not recognized" and leaves the weight as it was).
  :class:`FakeLdmForgeModel` is an A1111-shaped model with ``forge_objects``: text through
  A1111's hijacked embedder and ``sd_hijack``'s embedding database.
"""

from __future__ import annotations

import contextlib
import logging
import types
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .unets import ADM_IN_CHANNELS, CONTEXT_DIM, tiny_ldm_unet
from .webui_fakes import (
    FakeClipEmbedder,
    FakeEmbeddingDb,
    FakeState,
    IdsLookup,
    encode_with_fixes,
    fake_tokenize,
    modules_installed,
)


class ForgeLinear(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def forgeify(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` by :class:`ForgeLinear` (in place)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, ForgeLinear(child))
        else:
            forgeify(child)
    return module


def _set_param(root: nn.Module, key: str, value: torch.Tensor) -> None:
    *path, leaf = key.split(".")
    m = root
    for part in path:
        m = getattr(m, part)
    m._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _get_param(root: nn.Module, key: str) -> torch.Tensor:
    return dict(root.named_parameters())[key]


def forge2_merge(plist: list, weight: torch.Tensor, key: str) -> torch.Tensor:
    """Forge 2's ``merge_lora_to_weight``, for the ``lora`` type: ``v[0]`` is the type name,
    so anything but a ``(type, values)`` tuple fails."""
    for strength, value, strength_model, _offset, _fn in plist:
        kind, (up, down, alpha, _mid, _dora) = value
        assert kind == "lora"
        weight = weight * strength_model
        scale = (alpha / down.shape[0]) if alpha is not None else 1.0
        diff = (up.flatten(1).float() @ down.flatten(1).float()).reshape(weight.shape)
        weight = weight + strength * scale * diff
    return weight


class FakeLoraLoader:
    def __init__(self, model: nn.Module, merge=forge2_merge) -> None:
        self.model = model
        self.merge = merge
        self.backup: dict[str, torch.Tensor] = {}
        self.loaded_hash = str([])
        self.merges = 0

    @torch.inference_mode()
    def refresh(self, lora_patches: dict[tuple, dict[str, list]]) -> None:
        h = str(list(lora_patches.keys()))
        if h == self.loaded_hash:
            return
        for key, w in self.backup.items():
            _set_param(self.model, key, w)
        self.backup.clear()
        merged: dict[str, torch.Tensor] = {}
        for patches in lora_patches.values():
            for key, plist in patches.items():
                if key not in merged:
                    self.backup[key] = _get_param(self.model, key).detach().clone()
                    merged[key] = self.backup[key].float().clone()
                merged[key] = self.merge(plist, merged[key], key)
        for key, w in merged.items():
            _set_param(self.model, key, w.to(self.backup[key].dtype))
        self.loaded_hash = h
        self.merges += 1


class FakeModelPatcher:
    merge = staticmethod(forge2_merge)

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.lora_patches: dict[tuple, dict[str, list]] = {}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = FakeLoraLoader(model, self.merge)
        self.lora_loader: FakeLoraLoader = model.lora_loader

    def clone(self) -> FakeModelPatcher:
        n = type(self)(self.model)
        n.lora_patches = self.lora_patches.copy()
        return n

    def add_patches(
        self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False
    ):
        identifier = (filename, strength_patch, strength_model, online_mode)
        keys = {k for k, _ in self.model.named_parameters()}
        this: dict[str, list] = {}
        accepted = set()
        for k, v in patches.items():
            if k in keys:
                accepted.add(k)
                this.setdefault(k, []).append([strength_patch, v, strength_model, None, None])
        self.lora_patches[identifier] = this
        return accepted

    def refresh_loras(self) -> None:
        self.lora_loader.refresh(self.lora_patches)


class FakePredictor(nn.Module):
    prediction_type = "epsilon"

    def __init__(self) -> None:
        super().__init__()
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())


class FakeKModel(nn.Module):
    def __init__(self, unet: nn.Module, storage=torch.float32) -> None:
        super().__init__()
        self.diffusion_model = unet
        self.predictor = FakePredictor()
        self.storage_dtype, self.computation_dtype = storage, torch.float32


class FakeEmbeddingDatabase(IdsLookup):
    """Forge's ``EmbeddingDatabase``: names tokenized by the engine's own tokenizer."""

    def register_embedding(self, embedding: Any) -> Any:
        return self.register_embedding_by_name(embedding, embedding.name)

    def register_embedding_by_name(self, embedding: Any, name: str) -> Any:
        return self._register(embedding, name, fake_tokenize([name])[0])


class _TokenEmbedding(nn.Module):
    """``CLIPEmbeddingForTextualInversion``: ``wrapped`` is the model's own table."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.wrapped = nn.Embedding(4096, width)


class FakeTextEngine:
    """Forge's ``ClassicTextProcessingEngine``, reduced: its tokenizer (a word of ≤ 4
    characters is one id, longer ones 3-character pieces), registered embeddings spliced
    at their positions, a linear mix over positions; the CLIP-G engine also returns a
    pooled vector. ``text_encoder.transformer.text_model.embeddings.token_embedding`` is
    where Forge keeps the table. ``clip_skip`` (the engine's own, set by the model's
    ``set_clip_skip``; built as 1 for SD1, 2 for SDXL) picks another output layer: here a
    second mix."""

    def __init__(self, key: str, width: int = 24, out: int = CONTEXT_DIM, skip: int = 1) -> None:
        self.embedding_key = key
        self.clip_skip = self.minimal_clip_skip = skip
        self.embeddings = FakeEmbeddingDatabase()
        self.return_pooled = key == "clip_g"
        token_embedding = _TokenEmbedding(width)
        mix = nn.Linear(width, out)
        embeddings = nn.Module()
        embeddings.token_embedding = token_embedding
        text_model = nn.Module()
        text_model.embeddings, text_model.mix = embeddings, mix
        text_model.mix_skip = nn.Linear(width, out)  # the penultimate layer's output
        transformer = nn.Module()
        transformer.text_model = text_model
        self.text_encoder = nn.Module()
        self.text_encoder.transformer = transformer

    def tokenize(self, texts):
        return fake_tokenize(texts)

    def __call__(self, texts):
        model = self.text_encoder.transformer.text_model
        table = model.embeddings.token_embedding.wrapped
        mix = model.mix if self.clip_skip <= 1 else model.mix_skip
        z = encode_with_fixes(texts, self.embeddings, table, self.embedding_key, mix)
        return (z, z.mean(1)) if self.return_pooled else z


class _Posterior:
    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self) -> torch.Tensor:
        return self.mean + torch.randn_like(self.mean)


class FakeVaeModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 8, stride=8)
        self.dec = nn.ConvTranspose2d(4, 3, 8, stride=8)

    def encode(self, x, regulation=None):
        post = _Posterior(self.enc(x))
        return regulation(post) if regulation is not None else post.sample()

    def process_in(self, z):
        return 0.18215 * z

    def process_out(self, z):
        return z / 0.18215


class FakeForgeObjects:
    def __init__(self, unet, clip, vae, clipvision=None) -> None:
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self) -> FakeForgeObjects:
        return FakeForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class FakeForgeModel:
    """Forge's SD1 ``StableDiffusion`` engine, reduced (built under inference mode as
    ``forge_model_reload`` does)."""

    is_sd1, is_sd2, is_sdxl = True, False, False

    @torch.inference_mode()
    def __init__(
        self, seed: int = 0, storage=torch.float32, family: str = "sd1", patcher_cls=None
    ) -> None:
        self.is_sd1, self.is_sdxl = family == "sd1", family == "sdxl"
        unet = forgeify(tiny_ldm_unet(family, seed=seed))
        unet = _inference_copy(unet)
        patcher = (patcher_cls or FakeModelPatcher)(FakeKModel(unet, storage))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            vae_model = FakeVaeModel()
            if self.is_sdxl:  # SDXL: two engines, no single one
                half = CONTEXT_DIM // 2
                self.text_processing_engine_l = FakeTextEngine("clip_l", 768, half, skip=2)
                self.text_processing_engine_g = FakeTextEngine("clip_g", 1280, half, skip=2)
            else:
                self.text_processing_engine = FakeTextEngine("clip_l", 768)
            for engine in self.engines():
                _inference_copy(engine.text_encoder, requires_grad=True)
        vae = types.SimpleNamespace(
            first_stage_model=vae_model, device=torch.device("cpu"), vae_dtype=torch.float32
        )
        self.forge_objects = FakeForgeObjects(patcher, types.SimpleNamespace(), vae)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.sd_checkpoint_info = types.SimpleNamespace(
            name="fake.safetensors", name_for_extra="fake"
        )
        self.calls = {"cond": 0}

    def set_clip_skip(self, clip_skip: int) -> None:
        """Forge calls it with the "Clip skip" setting before a generation's conds."""
        for engine in self.engines():
            engine.clip_skip = clip_skip

    def engines(self) -> list[FakeTextEngine]:
        if self.is_sdxl:
            return [self.text_processing_engine_l, self.text_processing_engine_g]
        return [self.text_processing_engine]

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts: list[str]) -> Any:
        """As Forge's engines: SD1 one engine; SDXL CLIP-L ‖ CLIP-G and the pooled CLIP-G
        vector followed by the size embedding (here: constant ones)."""
        self.calls["cond"] += 1
        if self.is_sdxl:
            cond_l = self.text_processing_engine_l(prompts)
            cond_g, pooled = self.text_processing_engine_g(prompts)
            flat = torch.ones(len(prompts), ADM_IN_CHANNELS - pooled.shape[1])
            return {
                "crossattn": torch.cat([cond_l, cond_g], 2),
                "vector": torch.cat([pooled, flat], 1),
            }
        return self.text_processing_engine(prompts)

    @torch.inference_mode()
    def encode_first_stage(self, x):
        vae = self.forge_objects.vae.first_stage_model
        return vae.process_in(vae.encode(x))

    @torch.inference_mode()
    def decode_first_stage(self, z):
        vae = self.forge_objects.vae.first_stage_model
        return torch.tanh(vae.dec(vae.process_out(z)))

    def sample_unet(self, x, t, cond) -> torch.Tensor:
        """One UNet call the way sampling does it: load (refresh) the current patcher."""
        patcher = self.forge_objects.unet
        patcher.refresh_loras()
        with torch.inference_mode():
            return patcher.model.diffusion_model(x, t, context=cond)


def _inference_copy(module: nn.Module, requires_grad: bool = False) -> nn.Module:
    """Make every parameter an inference tensor (Forge loads under inference_mode; its text
    encoders' parameters even keep ``requires_grad=True``, which autograd then refuses to
    touch outside inference mode)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=requires_grad)
    return module


@contextlib.contextmanager
def fake_forge_modules(sd_model: Any):
    """``modules`` (shared, sd_models, processing) and ``backend.memory_management`` fakes."""
    shared = types.ModuleType("modules.shared")
    shared.state = FakeState()
    shared.cmd_opts = types.SimpleNamespace(lowvram=False, api_auth=None)
    shared.opts = types.SimpleNamespace()
    shared.sd_model = types.SimpleNamespace()  # FakeInitialModel: nothing loaded yet
    sd_models = types.ModuleType("modules.sd_models")
    sd_models.reloads = 0

    def forge_model_reload():
        sd_models.reloads += 1
        shared.sd_model = sd_model

    sd_models.forge_model_reload = forge_model_reload
    processing = types.ModuleType("modules.processing")

    class StableDiffusionProcessing:
        cached_c: ClassVar[list] = [("key",), "cond", None]
        cached_uc: ClassVar[list] = [("key",), "uncond", None]

    class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
        cached_hr_c: ClassVar[list] = [("key",), "hr", None]
        cached_hr_uc: ClassVar[list] = [("key",), "hru", None]

    processing.StableDiffusionProcessing = StableDiffusionProcessing
    processing.StableDiffusionProcessingTxt2Img = StableDiffusionProcessingTxt2Img
    mm = types.ModuleType("backend.memory_management")
    mm.loaded: list[Any] = []
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.soft_empty_cache = lambda: None

    def load_model_gpu(patcher):
        mm.loaded.append(patcher)
        patcher.refresh_loras()

    mm.load_model_gpu = load_model_gpu
    pkg = types.ModuleType("modules")
    pkg.__path__ = []
    pkg.shared, pkg.sd_models, pkg.processing = shared, sd_models, processing
    backend = types.ModuleType("backend")
    backend.__path__ = []
    backend.memory_management = mm
    new = {
        "modules": pkg,
        "modules.shared": shared,
        "modules.sd_models": sd_models,
        "modules.processing": processing,
        "backend": backend,
        "backend.memory_management": mm,
    }
    with modules_installed(new):
        yield types.SimpleNamespace(
            shared=shared, sd_models=sd_models, processing=processing, mm=mm
        )


# --------------------------------------------------------------------------- the forks


class FakeWeightAdapterBase:
    """ComfyUI's ``weight_adapter.WeightAdapterBase`` (Neo: ``modules_forge/packages/comfy``,
    reForge: ``ldm_patched/modules/weight_adapter``)."""

    name: str


class FakeLoRAAdapter(FakeWeightAdapterBase):
    """Their ``LoRAAdapter(loaded_keys, weights)``, ``weights = (up, down, alpha, mid,
    dora_scale, reshape)``; ``calculate_weight`` adds ``strength · alpha/rank · up @ down``
    (alpha None → 1) in ``intermediate_dtype``, in place on the given weight."""

    name = "lora"

    def __init__(self, loaded_keys, weights) -> None:
        self.loaded_keys, self.weights = loaded_keys, weights

    def calculate_weight(
        self,
        weight,
        key,
        strength,
        strength_model,
        offset,
        function,
        intermediate_dtype=torch.float32,
        original_weight=None,
    ):
        up, down, alpha, mid, dora_scale, reshape = self.weights
        assert mid is None and dora_scale is None and reshape is None  # not reproduced
        mat1 = up.to(weight.device, intermediate_dtype)
        mat2 = down.to(weight.device, intermediate_dtype)
        scale = alpha / mat2.shape[0] if alpha is not None else 1.0
        diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
        weight += function(((strength * scale) * diff).type(weight.dtype))
        return weight


def weight_adapter_module() -> types.ModuleType:
    mod = types.ModuleType("weight_adapter")
    mod.WeightAdapterBase, mod.LoRAAdapter = FakeWeightAdapterBase, FakeLoRAAdapter
    mod.adapters = [FakeLoRAAdapter]
    return mod


def comfy_merge(patches, weight, key, *, strict: bool):
    """The ComfyUI-style merge of Neo (``merge_lora_to_weight``, ``strict``: an unknown type
    raises) and reForge (``lora.calculate_weight``: it logs and skips): weight-adapter objects
    compute themselves; tuples are only ``diff`` and ``set``."""
    for strength, v, strength_model, offset, function in patches:
        assert offset is None
        function = function or (lambda a: a)
        if strength_model != 1.0:
            weight *= strength_model
        if isinstance(v, FakeWeightAdapterBase):
            weight = v.calculate_weight(weight, key, strength, strength_model, offset, function)
            continue
        patch_type, v = ("diff", v) if len(v) == 1 else (v[0], v[1])
        if patch_type == "diff":
            weight += function(strength * v[0].to(weight))
        elif patch_type == "set":
            weight.copy_(v[0])
        elif strict:
            raise ValueError(f'"{key}" of type "{patch_type}" is not recognized...')
        else:
            logging.getLogger("fake_ldm").warning(
                "patch type not recognized %s %s", patch_type, key
            )
    return weight


def neo_merge(plist, weight, key):
    return comfy_merge(plist, weight, key, strict=True)


class FakeNeoModelPatcher(FakeModelPatcher):
    """Neo's ``ModelPatcher``: ``add_patches(patches, strength_patch, strength_model, *,
    filename=None, online_mode=None)``; the patches go to the LoRA loader (``lora_patches``,
    merged by ``refresh`` with :func:`neo_merge`) only when both keywords are given, else to
    ``self.patches`` (ComfyUI's per-load path, not reproduced: tests check it stays empty)."""

    merge = staticmethod(neo_merge)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.patches: dict[str, list] = {}

    def clone(self) -> FakeNeoModelPatcher:
        n = super().clone()
        n.patches = self.patches.copy()
        return n

    def add_patches(
        self, patches, strength_patch=1.0, strength_model=1.0, *, filename=None, online_mode=None
    ):
        lora = filename is not None and online_mode is not None
        keys = {k for k, _ in self.model.named_parameters()}
        this: dict[str, list] = {}
        accepted = []
        for k, v in patches.items():
            if k in keys:
                accepted.append(k)
                entry = (strength_patch, v, strength_model, None, None)
                (this if lora else self.patches).setdefault(k, []).append(entry)
        if lora:
            self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = this
        return accepted


@contextlib.contextmanager
def fake_neo_modules():
    """Neo's ``backend.patcher.lora`` (it imports ``weight_adapter`` from
    ``modules_forge.packages.comfy.lora``) and that ``weight_adapter`` package."""
    wa = weight_adapter_module()
    lora = types.ModuleType("backend.patcher.lora")
    lora.weight_adapter, lora.merge_lora_to_weight = wa, neo_merge
    patcher = types.ModuleType("backend.patcher")
    patcher.__path__ = []
    patcher.lora = lora
    with modules_installed(
        {
            "backend.patcher": patcher,
            "backend.patcher.lora": lora,
            "modules_forge.packages.comfy.weight_adapter": wa,
        }
    ):
        yield types.SimpleNamespace(lora=lora, weight_adapter=wa)


class FakeLdmModelPatcher:
    """``ldm_patched.modules.model_patcher.ModelPatcher`` of old Forge / Forge Classic /
    reForge: positional ``add_patches`` keeps the keys of the model's state dict in
    ``self.patches`` (a clone copies each list); ``patch_model`` backs up and merges every
    patched key, swapping in a new parameter; ``unpatch_model`` puts the backups back.
    ``flavour`` picks the merge: ``"classic"`` takes ``("lora", (up, down, alpha, mid, …))``
    tuples, ``"reforge"`` only weight-adapter objects (see :func:`comfy_merge`)."""

    def __init__(self, model: nn.Module, flavour: str) -> None:
        self.model, self.flavour = model, flavour
        self.patches: dict[str, list] = {}
        self.backup: dict[str, torch.Tensor] = {}

    def clone(self) -> FakeLdmModelPatcher:
        n = FakeLdmModelPatcher(self.model, self.flavour)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        keys = set(self.model.state_dict())
        accepted = set()
        for k, v in patches.items():
            if k in keys:
                accepted.add(k)
                entry = (strength_patch, v, strength_model, None, None)
                self.patches.setdefault(k, []).append(entry)
        return list(accepted)

    def _merge(self, plist, weight, key):
        if self.flavour == "reforge":
            return comfy_merge(plist, weight, key, strict=False)
        for alpha, v, strength_model, _offset, _fn in plist:  # Classic's calculate_weight
            if strength_model != 1.0:
                weight *= strength_model
            patch_type, v = v
            if patch_type != "lora":
                raise NotImplementedError(patch_type)
            mat1, mat2 = v[0].float(), v[1].float()
            if v[2] is not None:
                alpha *= v[2] / mat2.shape[0]
            assert v[3] is None  # LoCon mid weights: not reproduced
            weight += (alpha * torch.mm(mat1.flatten(1), mat2.flatten(1))).reshape(weight.shape)
        return weight

    @torch.no_grad()
    def patch_model(self) -> None:
        for key, plist in self.patches.items():
            weight = _get_param(self.model, key)
            if key not in self.backup:
                self.backup[key] = weight.detach()
            out = self._merge(plist, weight.detach().float().clone(), key)
            _set_param(self.model, key, out.to(weight.dtype))

    def unpatch_model(self) -> None:
        for key, w in self.backup.items():
            _set_param(self.model, key, w)
        self.backup.clear()


class FakeBaseModel(nn.Module):
    """ldm_patched's ``BaseModel``: ``diffusion_model``, no ``predictor``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = unet


class FakeLdmVae(nn.Module):
    """ldm's ``AutoencoderKL`` as old Forge keeps it: ``encode(x)`` → a posterior."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 8, stride=8)
        self.dec = nn.ConvTranspose2d(4, 3, 8, stride=8)

    def encode(self, x):
        return _Posterior(self.enc(x))


class FakeLdmForgeModel:
    """An SD1 model of old Forge / Forge Classic / reForge (``modules_forge/forge_loader.py``):
    A1111's ``LatentDiffusion`` shape (``model.diffusion_model``, ``parameterization``,
    ``alphas_cumprod``, flags, hijacked ``cond_stage_model`` over ``sd_hijack``'s embedding
    database) plus ``forge_objects*`` of :class:`FakeLdmModelPatcher`. Loaded at start (no
    ``forge_model_reload``); the first-stage helpers run under ``inference_mode`` and return
    scaled latents (``get_first_stage_encoding`` is the identity)."""

    is_sd1, is_sd2, is_sdxl = True, False, False
    parameterization = "eps"

    def __init__(self, flavour: str = "classic", seed: int = 0) -> None:
        with torch.inference_mode():
            unet = _inference_copy(tiny_ldm_unet("sd1", seed=seed))
        base = FakeBaseModel(unet)
        self.model = base  # sd_model.model.diffusion_model is the patcher's UNet
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.vae = FakeLdmVae()
            self.embedding_db = FakeEmbeddingDb()
            self.cond_stage_model = FakeClipEmbedder(self.embedding_db, 768, CONTEXT_DIM)
        with torch.inference_mode():
            _inference_copy(self.cond_stage_model, requires_grad=True)
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()
        clip = types.SimpleNamespace(
            patcher=FakeLdmModelPatcher(self.cond_stage_model, flavour),
            cond_stage_model=self.cond_stage_model,
        )
        vae = types.SimpleNamespace(first_stage_model=self.vae)
        unet_patcher = FakeLdmModelPatcher(base, flavour)
        self.forge_objects = FakeForgeObjects(unet_patcher, clip, vae)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.sd_checkpoint_info = types.SimpleNamespace(
            name="fake.safetensors", name_for_extra="fake"
        )

    def get_learned_conditioning(self, prompts):
        return self.cond_stage_model(prompts)

    @torch.inference_mode()
    def encode_first_stage(self, x):
        return 0.18215 * self.vae.encode(x).sample()

    def get_first_stage_encoding(self, z):
        return z

    @torch.inference_mode()
    def decode_first_stage(self, z):
        return torch.tanh(self.vae.dec(z / 0.18215))


def fake_ldm_management() -> types.ModuleType:
    """``ldm_patched.modules.model_management``: loading a patcher unpatches the clone of the
    same model that was loaded before (``unload_model_clones``), then patches this one."""
    mm = types.ModuleType("ldm_patched.modules.model_management")
    mm.current: dict[int, Any] = {}
    mm.loaded: list[Any] = []

    def load_models_gpu(models, memory_required=0):
        for patcher in models:
            mm.loaded.append(patcher)
            old = mm.current.get(id(patcher.model))
            if old is patcher:
                continue
            if old is not None:
                old.unpatch_model()
            patcher.patch_model()
            mm.current[id(patcher.model)] = patcher

    mm.load_models_gpu = load_models_gpu
    mm.load_model_gpu = lambda model: load_models_gpu([model])
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.soft_empty_cache = lambda force=False: None
    return mm


@contextlib.contextmanager
def fake_ldm_forge_modules(sd_model: FakeLdmForgeModel, flavour: str = "classic"):
    """Old Forge / Forge Classic / reForge: ``modules`` (model loaded at start, no
    ``forge_model_reload``; ``sd_hijack.model_hijack.embedding_db``), ``modules_forge``,
    ``ldm_patched.modules.model_management`` and ``…lora`` (reForge's imports
    ``weight_adapter``, Classic's does not) and no ``backend`` at all."""
    shared = types.ModuleType("modules.shared")
    shared.state = FakeState()
    shared.cmd_opts = types.SimpleNamespace(lowvram=False, api_auth=None)
    shared.opts = types.SimpleNamespace()
    shared.sd_model = sd_model
    sd_models = types.ModuleType("modules.sd_models")
    hijack = types.ModuleType("modules.sd_hijack")
    hijack.model_hijack = types.SimpleNamespace(embedding_db=sd_model.embedding_db)
    processing = types.ModuleType("modules.processing")

    class StableDiffusionProcessing:
        cached_c: ClassVar[list] = [("key",), "cond", None]
        cached_uc: ClassVar[list] = [("key",), "uncond", None]

    processing.StableDiffusionProcessing = StableDiffusionProcessing
    pkg = types.ModuleType("modules")
    pkg.__path__ = []
    pkg.shared, pkg.sd_models, pkg.sd_hijack, pkg.processing = (
        shared,
        sd_models,
        hijack,
        processing,
    )
    mm = fake_ldm_management()
    lora = types.ModuleType("ldm_patched.modules.lora")
    if flavour == "reforge":
        lora.weight_adapter = weight_adapter_module()
    ldm = types.ModuleType("ldm_patched")
    ldm_modules = types.ModuleType("ldm_patched.modules")
    ldm.__path__, ldm_modules.__path__ = [], []
    ldm.modules, ldm_modules.model_management, ldm_modules.lora = ldm_modules, mm, lora
    with modules_installed(
        {
            "modules": pkg,
            "modules.shared": shared,
            "modules.sd_models": sd_models,
            "modules.sd_hijack": hijack,
            "modules.processing": processing,
            "modules_forge": types.ModuleType("modules_forge"),
            "ldm_patched": ldm,
            "ldm_patched.modules": ldm_modules,
            "ldm_patched.modules.model_management": mm,
            "ldm_patched.modules.lora": lora,
            "backend": None,  # not there: `import backend` raises ModuleNotFoundError
        }
    ):
        yield types.SimpleNamespace(
            shared=shared, mm=mm, lora=lora, processing=processing, hijack=hijack
        )


# --------------------------------------------------------------------------- Forge's gradio


class _ForgeEventWrapper:
    """Forge's ``EventWrapper``: an event listener that takes gradio 3's ``_js=`` as ``js=``."""

    def __init__(self, event: Any) -> None:
        self.event = event

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "_js" in kwargs:
            kwargs["js"] = kwargs.pop("_js")
        return self.event(*args, **kwargs)


def forge_gradio_patches(gr: Any) -> None:
    """What Forge 2's ``modules/gradio_extensions.py`` does to gradio 4 at start, restated:
    every component and layout with events gets an ``__init__`` that takes ``tooltip=``,
    turns gradio 3's ``source=x`` into ``sources=[x]``, drops any other keyword its gradio 4
    ``__init__`` lacks (with a warning: "unexpected argument for <class>: <name>"), and wraps
    each event so that ``_js=`` works; ``Dependency.then`` takes ``_js=`` too; ``gr.Box`` is
    ``gr.Group``. Patches the classes of ``gr`` in place (a test process of its own)."""
    import functools
    import inspect
    import warnings

    def repair(cls: type) -> None:
        original = cls.__init__
        allowed = inspect.signature(original).parameters

        @functools.wraps(original)
        def __init__(self, *args, tooltip=None, source=None, **kwargs):
            if source:
                kwargs["sources"] = [source]
            for key in [k for k in kwargs if k not in allowed]:
                warnings.warn(f"unexpected argument for {cls.__name__}: {key}", stacklevel=2)
                del kwargs[key]
            original(self, *args, **kwargs)
            self.webui_tooltip = tooltip
            for event in self.EVENTS:
                setattr(self, str(event), _ForgeEventWrapper(getattr(self, str(event))))

        cls.__init__ = __init__

    for name in sorted(set(gr.components.__all__ + gr.layouts.__all__)):
        cls = getattr(gr, name, None)
        if isinstance(cls, type) and getattr(cls, "EVENTS", None):
            repair(cls)

    class Dependency(gr.events.Dependency):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            then = self.then

            def then_js(*a: Any, _js: str | None = None, **k: Any) -> Any:
                if _js:
                    k["js"] = _js
                return then(*a, **k)

            self.then = then_js

    gr.events.Dependency = Dependency
    gr.Box = gr.Group
