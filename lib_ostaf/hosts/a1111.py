"""AUTOMATIC1111 host: the loaded ``shared.sd_model`` seen through the Host protocol, and
the two ways of applying adapters at generation time.

* :class:`A1111Host` — training goes through the WebUI's own call path: ``apply_model``
  (so ``--medvram`` offloading keeps working), the first stage for latents and
  ``get_learned_conditioning`` for prompts (SDXL returns a dict). Never a second copy.
* :class:`A1111Applier` — ``<ostaf:…>`` rides the built-in Lora extension: our files are
  loaded with its own loader and appended to ``networks.loaded_networks`` after it has
  activated, so it merges them with its backup/restore (weights restored exactly, composes
  with ``<lora:…>``). Only when the Lora extension is disabled, our own
  :class:`~lib_ostaf.method.offsets.WeightPatcher` merges and restores instead.

``modules.*`` (and the Lora extension's ``networks``) are imported lazily inside functions:
importing this file needs no WebUI. Tests pass a fake ``sd_model`` / ``networks``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lib_ostaf.errors import IncompatibleModelError, InputError, OstafError
from lib_ostaf.files.naming import NATIVE_RESOLUTION, UNetInfo, inspect_unet
from lib_ostaf.hosts.webui_common import (
    WebuiText,
    clear_cond_cache,
    embedding_class,
    embedding_db,
    make_embedding,
    wanted_tokens,
)
from lib_ostaf.method.apply import merge_terms
from lib_ostaf.method.images import square
from lib_ostaf.method.offsets import WeightPatcher
from lib_ostaf.method.parts import module_parts
from lib_ostaf.method.schedule import StepSchedule
from lib_ostaf.webui.activation import PlannedAdapter
from lib_ostaf.webui.jobs import Job, JobManager
from lib_ostaf.webui.object_job import ObjectRequest
from lib_ostaf.webui.on_loaded_model import run_on_loaded_model
from lib_ostaf.webui.registry import AdapterRegistry
from lib_ostaf.webui.training_job import (
    TrainRequest,
    preserve_module_state,
)

NET_PREFIX = "ostaf:"  # names of our networks in Lora's loaded set
EMBEDDING_MODULE = "modules.textual_inversion.textual_inversion"
MAX_INIT_TOKENS = 75


class A1111Text(WebuiText):
    """One of A1111's (hijacked) CLIP embedders: token rows through its own
    ``encode_embedding_init_text``, ids through its ``tokenize``. New tokens reach it through
    the embedding database (:meth:`A1111Host.encode_prompt`)."""

    def __init__(self, embedder: Any, key: str) -> None:
        self.model = embedder
        self.key = key
        self.width = int(embedder.encode_embedding_init_text(",", 1).shape[-1])

    def ids(self, text: str) -> list[int]:
        return list(self.model.tokenize([text])[0])

    def rows(self, text: str) -> torch.Tensor:
        return self.model.encode_embedding_init_text(text, MAX_INIT_TOKENS)


def text_embedders(sd_model: Any) -> list[Any]:
    """SD1/SD2: ``cond_stage_model``; SDXL: the conditioner's CLIP-L then OpenCLIP-G."""
    conditioner = getattr(sd_model, "conditioner", None)
    if conditioner is not None:
        return [e for e in conditioner.embedders if hasattr(e, "encode_embedding_init_text")]
    return [sd_model.cond_stage_model]


def model_family(sd_model: Any) -> str:
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    return "sd1"


class A1111Host:
    """The loaded A1111 model as a :class:`~lib_ostaf.method.host.Host`."""

    def __init__(
        self,
        sd_model: Any,
        *,
        resolution: int | None = None,
        device: torch.device | str | None = None,
        autocast: Any = None,
    ) -> None:
        model = getattr(sd_model, "model", None)
        unet = getattr(model, "diffusion_model", None)
        if unet is None:
            raise IncompatibleModelError(
                "the loaded model has no UNet (sd_model.model.diffusion_model); OSTAF trains "
                "SD1, SD2 and SDXL checkpoints"
            )
        inpaint = getattr(sd_model, "is_sdxl_inpaint", False)
        if inpaint or getattr(model, "conditioning_key", None) in ("hybrid", "concat"):
            raise IncompatibleModelError(
                "the loaded checkpoint is an inpainting/instruct model; train on a regular "
                "SD1/SD2/SDXL checkpoint (the adapter then works with inpainting too)"
            )
        self.sd_model = sd_model
        self.unet: torch.nn.Module = unet
        self.family = model_family(sd_model)
        self.info: UNetInfo = inspect_unet(unet)
        param = getattr(sd_model, "parameterization", "eps")
        self.prediction_type = "v_prediction" if param == "v" else "epsilon"
        self.alphas_cumprod = torch.as_tensor(sd_model.alphas_cumprod).detach().float().cpu()
        first = next(unet.parameters())
        if first.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise IncompatibleModelError(
                f"the UNet weights are stored as {first.dtype}; training needs fp16/bf16/fp32 "
                "weights (turn off 'FP8 weight' in Settings → Optimizations)"
            )
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = first.dtype
        self.resolution = int(resolution or NATIVE_RESOLUTION[self.family])
        self.latent_channels = int(getattr(sd_model, "latent_channels", 4) or 4)
        self.latent_scale = 8
        self._text: tuple[A1111Text, ...] | None = None
        self._embedding_db: Any = None
        self._embedding_cls: type = embedding_class(EMBEDDING_MODULE)
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.base_model_name = str(getattr(info, "name_for_extra", "") or getattr(info, "name", ""))
        self._autocast = autocast or contextlib.nullcontext

    @property
    def text_encoders(self) -> tuple[A1111Text, ...]:
        """Object implantation only (built on first use: it runs the token embedding)."""
        if self._text is None:
            keys = ("clip_l", "clip_g") if self.family == "sdxl" else ("clip_l",)
            if self.family == "sd2":
                keys = ("clip_h",)
            embedders = text_embedders(self.sd_model)
            self._text = tuple(A1111Text(e, k) for e, k in zip(embedders, keys, strict=False))
        return self._text

    @classmethod
    def from_webui(cls, *, resolution: int | None = None) -> A1111Host:
        """The WebUI's loaded model; clear errors for --lowvram / no model."""
        from modules import devices, shared

        if getattr(shared.cmd_opts, "lowvram", False):
            raise InputError(
                "OSTAF training does not work with --lowvram (the UNet is split across "
                "devices, so it cannot be back-propagated); restart with --medvram or without it"
            )
        sd_model = shared.sd_model
        if sd_model is None:
            raise InputError("no model is loaded; pick a checkpoint first")
        device = devices.device
        host = cls(sd_model, resolution=resolution, device=device, autocast=devices.autocast)
        compute = getattr(devices, "dtype_unet", None)  # fp16 unless --no-half
        if compute in (torch.float32, torch.float16, torch.bfloat16):
            host.dtype = compute
        return host

    # -- Host protocol --------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        image = square(image, self.resolution)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        vae = getattr(self.sd_model, "first_stage_model", None)
        vae_dtype = next(vae.parameters()).dtype if vae is not None else torch.float32
        x = x.permute(2, 0, 1)[None].to(self.device, vae_dtype)
        with self._autocast():
            posterior = self.sd_model.encode_first_stage(x)
            if hasattr(posterior, "mode"):  # SD1/SD2: a distribution; take its mode
                posterior = posterior.mode()
            latents = self.sd_model.get_first_stage_encoding(posterior)
        return latents.to(self.dtype)

    def encode_prompt(self, prompt: str, embeddings: Any = None) -> Any:
        """``get_learned_conditioning``; with ``embeddings`` the new tokens are registered in
        the embedding database for this call only (A1111's own textual-inversion path) and
        the result is differentiable in their vectors."""
        if not embeddings:
            with torch.no_grad(), self._autocast():
                cond = self.sd_model.get_learned_conditioning([prompt])
            if isinstance(cond, dict):  # SDXL: {"crossattn", "vector"}
                return {k: v.detach().clone() for k, v in cond.items()}
            return cond.detach().clone()
        with self._tokens(embeddings), self._trainable_text(), self._autocast():
            return self.sd_model.get_learned_conditioning([prompt])

    @contextlib.contextmanager
    def _tokens(self, embeddings: Any) -> Any:
        db = self._embedding_db or embedding_db()
        if db is None:
            raise IncompatibleModelError("the WebUI's embedding database is not available")
        before = {t: db.word_embeddings.get(t) for t in embeddings}
        try:
            for token, vectors in embeddings.items():
                emb = make_embedding(token, vectors, self.family, self._embedding_cls, live=True)
                db.register_embedding_by_name(emb, self.sd_model, token)
            yield
        finally:
            for token, old in before.items():
                db.register_embedding_by_name(None, self.sd_model, token)
                if old is not None:
                    db.register_embedding_by_name(old, self.sd_model, token)

    @contextlib.contextmanager
    def _trainable_text(self) -> Any:
        """sgm's conditioner runs embedders that are not ``is_trainable`` under no_grad."""
        embedders = [e.model for e in self.text_encoders if hasattr(e.model, "is_trainable")]
        saved = [e.is_trainable for e in embedders]
        try:
            for e in embedders:
                e.is_trainable = True
            with torch.enable_grad():
                yield
        finally:
            for e, flag in zip(embedders, saved, strict=True):
                e.is_trainable = flag

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        batch = x_t.shape[0]
        if isinstance(cond, dict):
            cond = {k: v.expand(batch, *v.shape[1:]) for k, v in cond.items()}
        else:
            cond = cond.expand(batch, *cond.shape[1:])
        with self._autocast():
            return self.sd_model.apply_model(x_t, t, cond)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> Image.Image:
        with self._autocast():
            x = self.sd_model.decode_first_stage(latents.to(self.device, self.dtype))
        x = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu()
        return Image.fromarray(x.numpy())


# ---------------------------------------------------------------------------------------------
# Generation: riding the built-in Lora, or our own merge when it is disabled


def lora_names(loaded: Sequence[Any]) -> tuple[tuple[Any, ...], ...]:
    """What the built-in Lora compares per layer to decide a re-merge (its ``wanted_names``:
    name, te/unet multipliers and dyn_dim of each loaded Network, in order)."""
    return tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in loaded)


def lora_networks() -> Any | None:
    """The built-in Lora extension's ``networks`` module, if it is loaded and usable."""
    net = sys.modules.get("networks")
    if net is None or not all(
        hasattr(net, a) for a in ("loaded_networks", "load_network", "network_apply_weights")
    ):
        return None
    return net


class A1111Applier:
    """Puts a :class:`~lib_ostaf.webui.activation.Plan`'s adapters on the loaded model."""

    def __init__(self, networks: Any = None, embeddings: Any = None) -> None:
        self._networks = networks  # injected by tests; else looked up on each call
        self._embedding_db = embeddings  # likewise (A1111's textual-inversion database)
        self._tokens: dict[str, tuple[tuple[object, ...], Any]] = {}  # token → (identity, emb)
        self._nets: dict[tuple[object, ...], Any] = {}  # file identity → Lora Network
        self._patcher: WeightPatcher | None = None
        self._patcher_unet: int | None = None
        self._info: UNetInfo | None = None
        self._schedule: StepSchedule = StepSchedule([], [])
        self.mode = ""  # "lora" | "fallback" after the last apply

    def networks(self) -> Any | None:
        return self._networks if self._networks is not None else lora_networks()

    def apply(self, sd_model: Any, adapters: Sequence[PlannedAdapter]) -> list[str]:
        """Make exactly ``adapters`` active (``[]`` = none); returns messages for skipped ones.
        Scheduled adapters (``start``/``end``) switch later, in :meth:`on_step`."""
        messages = self.register_embeddings(sd_model, adapters)
        self._schedule = StepSchedule(adapters, [(a.dials.start, a.dials.end) for a in adapters])
        adapters = self._schedule.first()
        networks = self.networks()
        if networks is not None and getattr(sd_model, "network_layer_mapping", None) is not None:
            self.mode = "lora"
            self._restore_patcher()
            return messages + self._apply_lora(networks, adapters)
        self.mode = "fallback"
        return messages + self._apply_fallback(sd_model, adapters)

    def on_step(self, sd_model: Any, step: int, total: int) -> list[str]:
        """Before the model call of ``step`` of ``total`` (a WebUI's ``on_cfg_denoiser``):
        switch the scheduled adapters whose window starts or ends here. Only their layers
        are re-merged; nothing happens between boundaries."""
        if not self._schedule.scheduled:
            return []
        adapters = self._schedule.at(step, total)
        if adapters is None:
            return []
        networks = self.networks()
        if self.mode == "lora" and networks is not None:
            return self._switch_lora(networks, sd_model, adapters)
        return self._apply_fallback(sd_model, adapters)

    def _switch_lora(
        self, networks: Any, sd_model: Any, adapters: Sequence[PlannedAdapter]
    ) -> list[str]:
        """Change our Networks in Lora's loaded set, and tell every layer no Network that
        changed touches that its merge is still current (Lora compares each layer's
        ``network_current_names`` with the whole set and would restore every layer)."""
        nets = {n.name: n for n in networks.loaded_networks}
        before = {key[0]: key for key in lora_names(networks.loaded_networks)}
        old = lora_names(networks.loaded_networks)
        messages = self._apply_lora(networks, adapters)
        nets |= {n.name: n for n in networks.loaded_networks}
        after = {key[0]: key for key in lora_names(networks.loaded_networks)}
        new = lora_names(networks.loaded_networks)
        moved = [nets[name] for name in nets if before.get(name) != after.get(name)]
        touched = {layer for n in moved for layer in n.modules}
        for layer, module in sd_model.network_layer_mapping.items():
            if layer in touched or getattr(module, "network_current_names", ()) != old:
                continue
            if getattr(module, "network_weights_backup", None) is not None or not new:
                module.network_current_names = new  # its weights already are what Lora wants
        return messages

    def database(self) -> Any | None:
        return self._embedding_db if self._embedding_db is not None else embedding_db()

    def register_embeddings(self, sd_model: Any, adapters: Sequence[PlannedAdapter]) -> list[str]:
        """Make exactly the object tokens of ``adapters`` known to the embedding database
        (before the prompts are encoded); a token of an adapter no longer active is removed."""
        db = self.database()
        family = model_family(sd_model)
        wanted, messages = wanted_tokens(
            adapters, family, lambda: A1111Host(sd_model).text_encoders
        )
        if db is None:
            if wanted:
                messages.append("OSTAF: no embedding database in this WebUI; tokens skipped.")
            return messages
        changed = False
        for token in [t for t in self._tokens if t not in wanted]:
            if db.word_embeddings.get(token) is self._tokens[token][1]:
                db.register_embedding_by_name(None, sd_model, token)
            del self._tokens[token]
            changed = True
        device = getattr(sys.modules.get("modules.devices"), "device", None)  # as A1111's TI
        for token, (planned, vectors) in wanted.items():
            known = self._tokens.get(token)
            key = (planned.identity, planned.token_weight)  # a learned placeholder: its λ
            if known and known[0] == key and db.word_embeddings.get(token) is known[1]:
                continue  # registered and still there (a TI reload clears the database)
            try:
                emb = make_embedding(
                    token, vectors, family, embedding_class(EMBEDDING_MODULE), device=device
                )
            except OstafError as e:
                messages.append(f"OSTAF: {planned.name}: {e}; token {token} skipped.")
                continue
            emb.filename = str(planned.adapter.path)
            db.register_embedding_by_name(emb, sd_model, token)
            self._tokens[token] = (key, emb)
            changed = True
        if changed:
            clear_cond_cache()  # same prompt text, different vectors
        return messages

    def reset(self, sd_model: Any = None) -> None:
        """Remove our adapters (Lora path: from its loaded set; fallback: restore weights)."""
        networks = self.networks()
        if networks is not None:
            networks.loaded_networks[:] = [
                n for n in networks.loaded_networks if not getattr(n, "ostaf", False)
            ]
        self._restore_patcher()
        db = self.database()
        for token, (_, emb) in list(self._tokens.items()):
            if db is not None and sd_model is not None and db.word_embeddings.get(token) is emb:
                db.register_embedding_by_name(None, sd_model, token)
        self._tokens.clear()

    def clear_for_training(self, sd_model: Any) -> None:
        """Put every weight back to the checkpoint's: no Lora or OSTAF delta merged."""
        self._restore_patcher()
        networks = self.networks()
        mapping = getattr(sd_model, "network_layer_mapping", None)
        if networks is None or mapping is None:
            return
        networks.loaded_networks.clear()
        with torch.no_grad():
            for module in list(mapping.values()):
                if getattr(module, "network_current_names", ()):
                    networks.network_apply_weights(module)  # empty set → restore from backup

    def finish(self) -> None:
        """After a batch: nothing to do (Lora and the fallback restore at the next plan)."""

    def forget(self) -> None:
        """After a checkpoint change: drop cached networks and the fallback patcher."""
        self._nets.clear()
        self._patcher, self._patcher_unet = None, None

    # -- the two paths --------------------------------------------------------------------
    def _apply_lora(self, networks: Any, adapters: Sequence[PlannedAdapter]) -> list[str]:
        messages: list[str] = []
        loaded = [n for n in networks.loaded_networks if not getattr(n, "ostaf", False)]
        for planned in adapters:
            for part, lam in planned.merges():
                if lam == 0:
                    continue  # λ = 0 is the identity: nothing to merge
                try:
                    net = self._lora_network(networks, planned, part)
                except Exception as e:  # Lora's loader raises AssertionError/RuntimeError/...
                    messages.append(f"OSTAF: could not load {planned.name} ({e}); skipped.")
                    continue
                net.te_multiplier = net.unet_multiplier = float(lam)
                net.dyn_dim = None
                loaded.append(net)
        networks.loaded_networks[:] = loaded
        return messages

    def _lora_network(self, networks: Any, planned: PlannedAdapter, part: str | None = None) -> Any:
        """The Lora ``Network`` of the file, or of one of its parts (``part``): a part is
        the file loaded again with only that part's modules, so its multiplier is its λ."""
        key = (*planned.identity, part)
        net = self._nets.get(key)
        if net is not None:
            return net
        # the Lora extension's `network` module (its networks.py imports it)
        network = getattr(networks, "network", None) or sys.modules["network"]
        name = f"{NET_PREFIX}{planned.name}@{planned.short_hash}"
        name += "" if part is None else f"#{part or 'rest'}"
        # NetworkOnDisk registers itself in Lora's hash lookup (used to rewrite pasted
        # <lora:…> tags); keep that table as it was so our files never hijack a paste.
        lookup = getattr(networks, "available_network_hash_lookup", None)
        saved = dict(lookup) if isinstance(lookup, dict) else None
        try:
            on_disk = network.NetworkOnDisk(name, str(planned.adapter.path))
        finally:
            if saved is not None:
                lookup.clear()
                lookup.update(saved)
        net = networks.load_network(name, on_disk)
        keys = [k for k in planned.adapter.modules if k.startswith("lora_unet_")]
        if part is not None:
            parts = module_parts(planned.adapter)
            keys = [k for k in keys if parts.get(k, "") == part]
            net.modules = {  # Lora's modules know their file key (NetworkModule.network_key)
                layer: m
                for layer, m in net.modules.items()
                if parts.get(str(getattr(m, "network_key", "")).partition(".")[0], "") == part
            }
        expected = len(keys)
        if len(net.modules) < expected:
            raise IncompatibleModelError(
                f"only {len(net.modules)} of {expected} layers fit the loaded model"
            )
        net.ostaf = True
        net.mentioned_name = planned.name
        for old in [k for k in self._nets if k[0] == key[0] and k[-1] == part]:
            del self._nets[old]  # the same file, older content
        self._nets[key] = net
        return net

    def _apply_fallback(self, sd_model: Any, adapters: Sequence[PlannedAdapter]) -> list[str]:
        unet = sd_model.model.diffusion_model
        if self._patcher is None or self._patcher_unet != id(unet):
            linear = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
            self._patcher, self._patcher_unet = WeightPatcher(linear), id(unet)
            self._info = inspect_unet(unet)
        messages: list[str] = []
        terms = []
        for planned in adapters:
            try:
                assert self._info is not None
                weights = dict(planned.dials.parts)
                terms += merge_terms(planned.adapter, unet, self._info, planned.weight, weights)
            except IncompatibleModelError as e:
                messages.append(f"OSTAF: {e}; skipped.")
                continue
        try:
            self._patcher.apply(terms)
        except IncompatibleModelError as e:
            messages.append(f"OSTAF: {e}; no adapter applied.")
            self._patcher.apply([])
        return messages

    def _restore_patcher(self) -> None:
        if self._patcher is not None:
            self._patcher.restore()


# ---------------------------------------------------------------------------------------------
# Training inside the WebUI


def train_on_loaded_model(
    jobs: JobManager,
    job: Job,
    request: TrainRequest | ObjectRequest,
    out_dir: Path | str,
    applier: A1111Applier,
) -> dict[str, Any]:
    """Train (attribute or objects) on ``shared.sd_model``; the caller holds the queue lock.
    The model is left exactly as found: merged Lora/OSTAF deltas are cleared first (weights =
    checkpoint), offsets live only in forward hooks, object tokens only in the embedding
    database during each call, and requires_grad / train-eval modes are restored."""
    from modules import devices, shared

    @contextlib.contextmanager
    def loaded_model(request: TrainRequest | ObjectRequest) -> Iterator[A1111Host]:
        host = A1111Host.from_webui(resolution=request.resolution or None)
        applier.clear_for_training(host.sd_model)
        try:
            with preserve_module_state(host.sd_model):
                yield host
        finally:
            with contextlib.suppress(Exception):
                devices.torch_gc()

    return run_on_loaded_model(jobs, job, request, out_dir, shared.state, loaded_model)


# ---------------------------------------------------------------------------------------------
# Process-wide state: lives here (a cached package) so it survives "Reload UI", which
# re-executes the script file. A job still running keeps refusing a second one.


class WebuiState:
    def __init__(self) -> None:
        self.jobs = JobManager()
        self.applier = A1111Applier()
        self._registry: AdapterRegistry | None = None

    def registry(self, root: Callable[[], Path]) -> AdapterRegistry:
        if self._registry is None:
            self._registry = AdapterRegistry(root)
        else:
            self._registry._root = root  # the new script module's settings accessor
        return self._registry


_STATE: WebuiState | None = None


def webui_state() -> WebuiState:
    global _STATE
    if _STATE is None:
        _STATE = WebuiState()
    return _STATE
