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
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .unets import ADM_IN_CHANNELS, CONTEXT_DIM, tiny_ldm_unet
from .webui_fakes import FakeState, IdsLookup, encode_with_fixes, fake_tokenize


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


class FakeLoraLoader:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
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
                for strength, value, strength_model, _offset, _fn in plist:
                    kind, (up, down, alpha, _mid, _dora) = value
                    assert kind == "lora"
                    w = merged[key] * strength_model
                    scale = (alpha / down.shape[0]) if alpha is not None else 1.0
                    diff = (up.flatten(1).float() @ down.flatten(1).float()).reshape(w.shape)
                    merged[key] = w + strength * scale * diff
        for key, w in merged.items():
            _set_param(self.model, key, w.to(self.backup[key].dtype))
        self.loaded_hash = h
        self.merges += 1


class FakeModelPatcher:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.lora_patches: dict[tuple, dict[str, list]] = {}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = FakeLoraLoader(model)
        self.lora_loader: FakeLoraLoader = model.lora_loader

    def clone(self) -> FakeModelPatcher:
        n = FakeModelPatcher(self.model)
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
    where Forge keeps the table."""

    def __init__(self, key: str, width: int = 24, out: int = CONTEXT_DIM) -> None:
        self.embedding_key = key
        self.embeddings = FakeEmbeddingDatabase()
        self.return_pooled = key == "clip_g"
        token_embedding = _TokenEmbedding(width)
        mix = nn.Linear(width, out)
        embeddings = nn.Module()
        embeddings.token_embedding = token_embedding
        text_model = nn.Module()
        text_model.embeddings, text_model.mix = embeddings, mix
        transformer = nn.Module()
        transformer.text_model = text_model
        self.text_encoder = nn.Module()
        self.text_encoder.transformer = transformer

    def tokenize(self, texts):
        return fake_tokenize(texts)

    def __call__(self, texts):
        model = self.text_encoder.transformer.text_model
        table = model.embeddings.token_embedding.wrapped
        z = encode_with_fixes(texts, self.embeddings, table, self.embedding_key, model.mix)
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
    def __init__(self, seed: int = 0, storage=torch.float32, family: str = "sd1") -> None:
        self.is_sd1, self.is_sdxl = family == "sd1", family == "sdxl"
        unet = forgeify(tiny_ldm_unet(family, seed=seed))
        unet = _inference_copy(unet)
        patcher = FakeModelPatcher(FakeKModel(unet, storage))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            vae_model = FakeVaeModel()
            if self.is_sdxl:  # SDXL: two engines, no single one
                half = CONTEXT_DIM // 2
                self.text_processing_engine_l = FakeTextEngine("clip_l", 768, half)
                self.text_processing_engine_g = FakeTextEngine("clip_g", 1280, half)
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
    saved = {k: sys.modules.get(k) for k in new}
    sys.modules.update(new)
    try:
        yield types.SimpleNamespace(
            shared=shared, sd_models=sd_models, processing=processing, mm=mm
        )
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
