"""Small stand-ins for the WebUI (as Bing-su/adetailer tests do): logic only, no WebUI.

* :class:`FakeSdModel` — an A1111-shaped ``sd_model`` around the real ldm ``UNetModel``
  (tiny, from tests/unets.py): ``model.diffusion_model``, ``apply_model``, first stage,
  ``get_learned_conditioning``, ``alphas_cumprod``, ``parameterization``.
* :func:`fake_modules` — a ``modules`` package with ``shared`` (state, opts, cmd_opts,
  sd_model) and ``devices``, installed in ``sys.modules`` for a test.
* :class:`FakeLora` — the built-in Lora's observable behaviour: ``loaded_networks``,
  ``load_network`` (kohya file → modules keyed by ``network_layer_name``, through
  :func:`a1111_lookup`: A1111's own key rules restated, never lib_ostaf's naming), and
  the lazy per-layer backup / restore / merge of ``network_apply_weights``.
* :func:`fake_script_modules` — the ``modules.*`` that ``scripts/ostaf.py`` imports, enough
  to build its tab and accordion under a real gradio (tests/test_gradio_wiring.py).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import re
import sys
import threading
import types
import zlib
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from lib_ostaf.files.adapter_file import LoraModule, save_adapter
from lib_ostaf.files.metadata import build_metadata
from lib_ostaf.files.sidecars import write_card
from lib_ostaf.method.targets import TargetSpec, select_targets

from .unets import ADM_IN_CHANNELS, CONTEXT_DIM, tiny_ldm_unet


class _Wrapper(nn.Module):
    """ldm's DiffusionWrapper: ``model(x, t, c_crossattn=[c])``."""

    conditioning_key = "crossattn"

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x, t, c_crossattn=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class _Posterior:
    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self) -> torch.Tensor:  # what A1111's get_first_stage_encoding would call
        return self.mean + torch.randn_like(self.mean)


def fake_tokenize(texts):
    """The fakes' tokenizer: a word of ≤ 4 characters is one vocabulary entry, longer ones
    split into 3-character pieces (so ``dog`` is in the vocabulary, ``<mug1>`` is not)."""
    out = []
    for text in texts:
        ids = []
        for w in text.lower().split():
            pieces = [w] if len(w) <= 4 else [w[i : i + 3] for i in range(0, len(w), 3)]
            ids += [zlib.crc32(piece.encode()) % 4000 + 1 for piece in pieces]
        out.append(ids)
    return out


class IdsLookup:
    """The WebUIs' ``EmbeddingDatabase`` lookup, copied in behaviour: name → embedding,
    first token id → [(ids, embedding)] longest first."""

    def __init__(self) -> None:
        self.word_embeddings: dict[str, Any] = {}
        self.ids_lookup: dict[int, list[tuple[list[int], Any]]] = {}

    def _register(self, embedding, name, ids):
        first = ids[0]
        lookup = [x for x in self.ids_lookup.get(first, []) if x[1].name != name]
        if embedding is not None:
            lookup.append((ids, embedding))
        self.ids_lookup[first] = sorted(lookup, key=lambda x: len(x[0]), reverse=True)
        if embedding is None:
            self.word_embeddings.pop(name, None)
            if not self.ids_lookup[first]:
                del self.ids_lookup[first]
            return None
        self.word_embeddings[name] = embedding
        return embedding

    def find_embedding_at_position(self, tokens, offset):
        for ids, embedding in self.ids_lookup.get(tokens[offset], []):
            if tokens[offset : offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None


class FakeEmbeddingDb(IdsLookup):
    """A1111's database: names tokenized by the loaded model's ``cond_stage_model``."""

    def register_embedding_by_name(self, embedding, model, name):
        return self._register(embedding, name, model.cond_stage_model.tokenize([name])[0])


def encode_with_fixes(texts, db: IdsLookup, table: nn.Embedding, key: str, mix: nn.Module):
    """Both WebUIs' text path, reduced: tokens → table rows, a registered embedding's vector
    spliced in where its name occurs (``EmbeddingsWithFixes``; ``key`` picks the SDXL
    half of a dict vector), padded to 7 positions, then a linear mix over positions so
    every token affects every output row."""
    length = 7
    rows = []
    for ids in fake_tokenize(texts):
        vecs, i = [], 0
        while i < len(ids):
            emb, n = db.find_embedding_at_position(ids, i)
            if emb is None:
                vecs.append(table(torch.tensor([ids[i]])))
                i += 1
                continue
            vec = emb.vec[key] if isinstance(emb.vec, dict) else emb.vec
            vecs.append(vec.to(table.weight))
            i += n
        x = torch.cat([*vecs, table.weight[:1].expand(length, -1)])[:length]
        rows.append(mix(x + x.mean(0, keepdim=True)))
    return torch.stack(rows)


class FakeClipEmbedder(nn.Module):
    """A1111's hijacked CLIP embedder (:func:`encode_with_fixes` over its own table)."""

    def __init__(self, db: FakeEmbeddingDb, width: int, out: int, key: str = "clip_l"):
        super().__init__()
        self.db, self.key = db, key
        self.token_embedding = nn.Embedding(4096, width)
        self.mix = nn.Linear(width, out)
        self.is_trainable = False  # sgm embedders: False → the conditioner uses no_grad

    def tokenize(self, texts):
        return fake_tokenize(texts)

    def encode_embedding_init_text(self, text, nvpt):
        ids = self.tokenize([text])[0][:nvpt]
        return self.token_embedding(torch.tensor(ids, dtype=torch.long))

    def forward(self, texts):
        return encode_with_fixes(texts, self.db, self.token_embedding, self.key, self.mix)


class FakeSdModel(nn.Module):
    """An SD1-shaped A1111 model (eps prediction, 8× VAE) built around a tiny ldm UNet."""

    is_sdxl = False
    is_sd2 = False
    is_sd1 = True
    parameterization = "eps"
    latent_channels = 4

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.model = _Wrapper(tiny_ldm_unet("sd1", seed=seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.first_stage_model = nn.ModuleDict(
                {
                    "enc": nn.Conv2d(3, 4, 8, stride=8),
                    "dec": nn.ConvTranspose2d(4, 3, 8, stride=8),
                }
            )
            self.embedding_db = FakeEmbeddingDb()
            self.cond_stage_model = FakeClipEmbedder(self.embedding_db, 24, CONTEXT_DIM)
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())
        self.sd_checkpoint_info = types.SimpleNamespace(
            name="fake.safetensors", name_for_extra="fake"
        )
        self.calls: dict[str, int] = {"apply_model": 0, "encode": 0, "cond": 0}

    def apply_model(self, x, t, cond):
        self.calls["apply_model"] += 1
        return self.model(x, t, c_crossattn=[cond])

    def encode_first_stage(self, x):
        self.calls["encode"] += 1
        return _Posterior(self.first_stage_model["enc"](x))

    def get_first_stage_encoding(self, z):
        return 0.18215 * (z.sample() if isinstance(z, _Posterior) else z)

    def decode_first_stage(self, z):
        return torch.tanh(self.first_stage_model["dec"](z / 0.18215))

    def get_learned_conditioning(self, prompts):
        self.calls["cond"] += 1
        return self.cond_stage_model(prompts)


class _XLWrapper(_Wrapper):
    conditioning_key = "crossattn"

    def forward(self, x, t, c_crossattn=None, y=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1), y=y)


class _Conditioner(nn.Module):
    """sgm's ``GeneralConditioner``: each embedder runs under ``no_grad`` unless
    ``is_trainable``; crossattn = CLIP-L ‖ CLIP-G, vector = pooled CLIP-G (padded)."""

    def __init__(self, db: FakeEmbeddingDb) -> None:
        super().__init__()
        half = CONTEXT_DIM // 2
        self.embedders = nn.ModuleList(
            [
                FakeClipEmbedder(db, 24, half, key="clip_l"),
                FakeClipEmbedder(db, 20, half, key="clip_g"),
                nn.Identity(),  # stands for the size/crop ConcatTimestepEmbedderND
            ]
        )

    def tokenize(self, texts):  # sd_models_xl: the first embedder that can
        return self.embedders[0].tokenize(texts)

    def forward(self, texts):
        outs = []
        for e in self.embedders[:2]:
            with contextlib.nullcontext() if e.is_trainable else torch.no_grad():
                outs.append(e(texts))
        pooled = outs[1].mean(1)
        vector = torch.cat(
            [pooled, pooled.new_zeros(len(texts), ADM_IN_CHANNELS - pooled.shape[1])], 1
        )
        return {"crossattn": torch.cat(outs, 2), "vector": vector}


class FakeSdxlModel(FakeSdModel):
    """An SDXL-shaped A1111 model: two text embedders in a conditioner, dict conditioning."""

    is_sdxl = True
    is_sd1 = False

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.model = _XLWrapper(tiny_ldm_unet("sdxl", seed=seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 2)
            self.conditioner = _Conditioner(self.embedding_db)
        self.cond_stage_model = self.conditioner  # A1111's hijack aliases it

    def apply_model(self, x, t, cond):
        self.calls["apply_model"] += 1
        return self.model(x, t, c_crossattn=[cond["crossattn"]], y=cond["vector"])

    def get_learned_conditioning(self, prompts):
        self.calls["cond"] += 1
        return self.conditioner(prompts)


class FakeState:
    """``shared.state`` fields and methods the extension uses."""

    def __init__(self) -> None:
        self.job = ""
        self.job_no = self.job_count = self.sampling_step = self.sampling_steps = 0
        self.interrupted = self.stopping_generation = False
        self.textinfo: str | None = None
        self.images: list[Any] = []
        self.id_live_preview = 0

    def interrupt(self) -> None:
        self.interrupted = True

    def begin(self, job: str = "(unknown)") -> None:  # A1111 resets the flags
        self.job, self.interrupted, self.stopping_generation = job, False, False

    def end(self) -> None:
        self.job = ""

    def assign_current_image(self, image: Any) -> None:
        self.images.append(image)
        self.id_live_preview += 1


@contextlib.contextmanager
def fake_modules(sd_model: Any, *, lowvram: bool = False, lora: FakeLora | None = None):
    """Install a fake ``modules`` package (and Lora's ``networks``/``network``) for a test."""
    shared = types.ModuleType("modules.shared")
    shared.state = FakeState()
    shared.cmd_opts = types.SimpleNamespace(lowvram=lowvram, medvram=False, api_auth=None)
    shared.opts = types.SimpleNamespace()
    shared.sd_model = sd_model
    devices = types.ModuleType("modules.devices")
    devices.device = torch.device("cpu")
    devices.dtype_unet = torch.float32
    devices.autocast = contextlib.nullcontext
    devices.torch_gc = lambda: None
    hijack = types.ModuleType("modules.sd_hijack")
    hijack.model_hijack = types.SimpleNamespace(
        embedding_db=getattr(sd_model, "embedding_db", None)
    )
    pkg = types.ModuleType("modules")
    pkg.__path__ = []
    pkg.shared, pkg.devices, pkg.sd_hijack = shared, devices, hijack
    new: dict[str, Any] = {
        "modules": pkg,
        "modules.shared": shared,
        "modules.devices": devices,
        "modules.sd_hijack": hijack,
    }
    if lora is not None:
        new |= {"networks": lora, "network": lora}  # NetworkOnDisk lives in network in A1111
    with modules_installed(new, also=("networks", "network")):
        yield shared


_MISSING = object()


@contextlib.contextmanager
def modules_installed(new: dict[str, Any], *, also: tuple[str, ...] = ()):
    """``new`` in ``sys.modules`` for the ``with`` block; afterwards each of those names (and
    of ``also``, names the block may install) is as it was: the same entry, or none."""
    saved = {k: sys.modules.get(k, _MISSING) for k in (*new, *also)}
    sys.modules.update(new)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is _MISSING:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


# --------------------------------------------------------------------------- built-in Lora


# A1111 ``networks.convert_diffusers_name_to_compvis``, restated from its rules (UNet and
# SD1 text encoder): a diffusers-style kohya layer name → the key of
# ``sd_model.network_layer_mapping`` (the ldm module path with "." → "_").
_RESNET_PARTS = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def _ldm_part(kind: str, rest: str) -> str:
    return _RESNET_PARTS.get(rest, rest) if kind == "resnets" else rest


_A1111_RULES = (
    (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
    (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
    (
        r"lora_unet_time_embedding_linear_(\d+)(.*)",
        lambda m: f"diffusion_model_time_embed_{2 * int(m[1]) - 2}{m[2]}",
    ),
    (
        r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
        lambda m: (
            f"diffusion_model_input_blocks_{1 + 3 * int(m[1]) + int(m[3])}_"
            f"{1 if m[2] == 'attentions' else 0}_{_ldm_part(m[2], m[4])}"
        ),
    ),
    (
        r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
        lambda m: (
            f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else 2 * int(m[2])}_"
            f"{_ldm_part(m[1], m[3])}"
        ),
    ),
    (
        r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
        lambda m: (
            f"diffusion_model_output_blocks_{3 * int(m[1]) + int(m[3])}_"
            f"{1 if m[2] == 'attentions' else 0}_{_ldm_part(m[2], m[4])}"
        ),
    ),
    (
        r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
        lambda m: f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op",
    ),
    (
        r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
        lambda m: (
            f"diffusion_model_output_blocks_{2 + 3 * int(m[1])}_{2 if int(m[1]) > 0 else 1}_conv"
        ),
    ),
    (
        r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
        lambda m: f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}",
    ),
)


def a1111_layer_key(layer: str) -> str:
    """The first rule whose pattern matches the start of ``layer``; else ``layer`` as is."""
    for pattern, convert in _A1111_RULES:
        m = re.match(pattern, layer)
        if m:
            return convert(m)
    return layer


def a1111_lookup(layer: str, mapping: dict[str, Any]) -> str | None:
    """A1111 ``load_network``'s search for one file layer: the converted key (a
    ``_q_proj``/``_k_proj``/``_v_proj`` key also by its module); else ``lora_unet`` →
    ``diffusion_model`` (files that already use ldm names, as SDXL ones do). None: not
    matched (A1111 only logs that at DEBUG)."""
    key = a1111_layer_key(layer)
    m = re.match(r"(.*)_([qkv]_proj)$", key)
    if key in mapping or (m and m[1] in mapping):
        return key
    if "lora_unet" in layer:
        key = layer.replace("lora_unet", "diffusion_model")
        return key if key in mapping else None
    return None


class FakeNetworkModule:
    def __init__(
        self, net: FakeNetwork, key: str, up: torch.Tensor, down: torch.Tensor, alpha: float
    ):
        self.network, self.up, self.down, self.alpha = net, up, down, alpha
        self.network_key = key  # A1111: the first file key of the module (NetworkWeights)

    def calc_updown(self, weight: torch.Tensor) -> tuple[torch.Tensor, None]:
        scale = self.alpha / self.down.shape[0]
        delta = (self.up.float() @ self.down.float()) * scale * self.network.unet_multiplier
        return delta.to(weight.dtype), None


class FakeNetwork:
    def __init__(self, name: str) -> None:
        self.name = name
        self.te_multiplier = self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules: dict[str, FakeNetworkModule] = {}
        self.mentioned_name = None


class FakeNetworkOnDisk:
    lookup: dict[str, Any] | None = None  # A1111: networks.available_network_hash_lookup

    def __init__(self, name: str, filename: str) -> None:
        self.name, self.filename = name, filename
        if self.lookup is not None:  # A1111's set_hash() registers every NetworkOnDisk
            self.lookup[Path(filename).stem[:12]] = self


class FakeLora:
    """A1111's Lora semantics, reduced to what weight integrity depends on."""

    def __init__(self, sd_model: FakeSdModel) -> None:
        self.network = self  # A1111's networks.py imports its sibling module `network`
        self.available_network_hash_lookup: dict[str, Any] = {"userlora1234": "user's"}
        self.NetworkOnDisk = type(
            "NetworkOnDisk", (FakeNetworkOnDisk,), {"lookup": self.available_network_hash_lookup}
        )
        self.sd_model = sd_model
        self.loaded_networks: list[Any] = []
        self.loads = 0
        self.remerged: list[str] = []  # layers re-merged, in order (what a set change costs)
        mapping = {}
        for name, module in sd_model.model.named_modules():
            layer = name.replace(".", "_")
            mapping[layer] = module
            module.network_layer_name = layer
        sd_model.network_layer_mapping = mapping

    def load_network(self, name: str, on_disk: FakeNetworkOnDisk) -> FakeNetwork:
        """A1111's ``load_network`` for LoRA modules: each file key splits at its first "."
        into layer and part; the layer is found by :func:`a1111_lookup`; unmatched keys are
        skipped."""
        self.loads += 1
        state = safetensors.torch.load_file(on_disk.filename)
        net = FakeNetwork(name)
        matched: dict[str, dict[str, torch.Tensor]] = {}
        first: dict[str, str] = {}  # A1111's NetworkWeights.network_key: first file key
        for key_network, weight in state.items():
            layer, _, part = key_network.partition(".")
            key = a1111_lookup(layer, self.sd_model.network_layer_mapping)
            if key is not None:
                first.setdefault(key, key_network)
                matched.setdefault(key, {})[part] = weight
        for key, w in matched.items():
            net.modules[key] = FakeNetworkModule(
                net,
                first[key],
                w["lora_up.weight"],
                w["lora_down.weight"],
                float(w["alpha"]),
            )
        return net

    def network_apply_weights(self, module: nn.Module) -> None:
        """A1111's lazy per-layer merge: backup once, restore + re-merge on set change."""
        layer = getattr(module, "network_layer_name", None)
        if layer is None or not hasattr(module, "weight"):
            return
        current = getattr(module, "network_current_names", ())
        wanted = tuple(
            (n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in self.loaded_networks
        )
        if getattr(module, "network_weights_backup", None) is None and wanted:
            if current:  # A1111: "no backup weights found and current weights are not unchanged"
                raise RuntimeError("no backup weights found and current weights are not unchanged")
            module.network_weights_backup = module.weight.detach().to("cpu", copy=True)
        if current == wanted:
            return
        self.remerged.append(layer)  # restored from its backup and merged again
        with torch.no_grad():
            backup = getattr(module, "network_weights_backup", None)
            if backup is not None:
                module.weight.copy_(backup)
            for net in self.loaded_networks:
                m = net.modules.get(layer)
                if m is not None:
                    updown, _ = m.calc_updown(module.weight)
                    module.weight.copy_(module.weight + updown)
        module.network_current_names = wanted

    def forward_all(self) -> None:
        """What one generation's forward does to every layer (lazy merge on use)."""
        for module in self.sd_model.network_layer_mapping.values():
            self.network_apply_weights(module)

    # A1111's ExtraNetworkLora.activate → load_networks(names, ...): clears the set first.
    def activate_lora(self, files: list[tuple[str, str, float]]) -> None:
        self.loaded_networks.clear()
        for name, path, mult in files:
            net = self.load_network(name, FakeNetworkOnDisk(name, path))
            net.te_multiplier = net.unet_multiplier = mult
            self.loaded_networks.append(net)


def make_adapter(
    folder: Path,
    name: str,
    unet: nn.Module,
    *,
    attribute: str = "appearance",
    family: str = "sd1",
    seed: int = 0,
    scale: float = 0.05,
    preferred: float | None = None,
    description: str = "",
) -> Path:
    """A random kohya adapter on ``attribute``'s layers of ``unet`` (no training needed);
    ``"shape+appearance"``: both parts, recorded in ``ostaf.parts``."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    parts: dict[str, list[str]] = {}
    for part in attribute.split("+"):
        for t in select_targets(unet, TargetSpec(attribute=part)):
            parts.setdefault(part, []).append(t.kohya)
            modules[t.kohya] = LoraModule(
                down=torch.randn(2, t.in_features, generator=g) * scale,
                up=torch.randn(t.out_features, 2, generator=g) * scale,
                alpha=2.0,
            )
    md = rank2_metadata(
        name,
        family,
        "attribute",
        64,
        ostaf={"attribute": attribute, "default_lambda": 0.7}
        | ({"parts": parts} if len(parts) > 1 else {}),
    )
    path = save_adapter(folder / f"{name}.safetensors", modules, md, overwrite=True)
    if preferred is not None or description:
        write_card(
            folder / name,
            preferred_weight=preferred or 0.0,
            activation_text="",
            description=description,
            sd_version="SD1",
            overwrite=True,
        )
    return path


def rank2_metadata(
    name: str,
    family: str,
    method: str,
    resolution: int,
    *,
    prediction_type: str = "epsilon",
    **fields: Any,
) -> dict[str, str]:
    """``build_metadata`` of the tests' small adapters: rank 2, alpha 2; ``fields``: the
    rest of its keywords (``ostaf`` at least)."""
    return build_metadata(
        name=name,
        family=family,
        prediction_type=prediction_type,
        rank=2,
        alpha=2.0,
        resolution=resolution,
        method=method,
        **fields,
    )


# --------------------------------------------------------------------------- script imports


def load_script(path: Path) -> types.ModuleType:
    """A1111's ``script_loading.load_module``: the file run as a module named after it."""
    spec = importlib.util.spec_from_file_location(path.name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_script_modules(folder: Path) -> dict[str, types.ModuleType]:
    """The ``modules.*`` that ``scripts/ostaf.py`` imports, enough to build its tab and
    accordion (no model): settings and callbacks recorded (``script_callbacks.registered``),
    A1111's ``Script.elem_id``, and ``call_queue.wrap_gradio_gpu_call``, which passes the
    event's values on to the function under the queue lock as A1111's does. A1111's wrapper
    hides the function's signature; this one keeps it as ``__wrapped__`` so that a test can
    compare an event's inputs with the function it calls. Install with
    ``sys.modules.update(...)``."""
    callbacks: dict[str, list] = {}

    def recorder(kind):
        return lambda fn, **kw: callbacks.setdefault(kind, []).append(fn)

    script_callbacks = types.ModuleType("modules.script_callbacks")
    kinds = ("before_ui", "ui_tabs", "app_started", "model_loaded", "script_unloaded")
    for kind in (*kinds, "cfg_denoiser"):
        setattr(script_callbacks, f"on_{kind}", recorder(kind))
    script_callbacks.registered = callbacks

    shared = types.ModuleType("modules.shared")
    shared.options_templates = {}
    shared.options_section = lambda section, options: options
    shared.OptionInfo = lambda default, label, *a, **k: types.SimpleNamespace(default=default)
    shared.opts = types.SimpleNamespace(samples_format="png")
    shared.cmd_opts = types.SimpleNamespace(
        ostaf_dir=str(folder), api_auth=None, lowvram=False, medvram=False
    )
    shared.sd_model = None
    shared.state = FakeState()

    scripts = types.ModuleType("modules.scripts")

    class Script:
        is_img2img = False

        def elem_id(self, item_id):  # A1111: tab name only when shown on both tabs
            both = self.show(True) == self.show(False)
            tab = ("img2img_" if self.is_img2img else "txt2img_") if both else ""
            title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
            return f"script_{tab}{title}_{item_id}"

    scripts.Script, scripts.AlwaysVisible, scripts.scripts_data = Script, object(), []

    call_queue = types.ModuleType("modules.call_queue")
    call_queue.queue_lock = threading.Lock()

    def wrap_gradio_gpu_call(func, extra_outputs=None):
        @functools.wraps(func)
        def f(*args, **kwargs):
            with call_queue.queue_lock:
                return func(*args, **kwargs)

        return f

    call_queue.wrap_gradio_gpu_call = wrap_gradio_gpu_call

    extra_networks = types.ModuleType("modules.extra_networks")
    extra_networks.ExtraNetwork = type("ExtraNetwork", (), {"__init__": _set_name})
    extra_networks.registered = []
    extra_networks.register_extra_network = extra_networks.registered.append

    uen = types.ModuleType("modules.ui_extra_networks")
    uen.ExtraNetworksPage = type("ExtraNetworksPage", (), {"__init__": _set_name})
    uen.pages = []
    uen.register_page = uen.pages.append
    uen.quote_js = json.dumps

    paths = types.ModuleType("modules.paths")
    paths.models_path = str(folder / "models")
    devices = types.ModuleType("modules.devices")
    devices.device, devices.dtype_unet = torch.device("cpu"), torch.float32
    devices.autocast, devices.torch_gc = contextlib.nullcontext, lambda: None

    mods = {
        "shared": shared,
        "script_callbacks": script_callbacks,
        "scripts": scripts,
        "call_queue": call_queue,
        "extra_networks": extra_networks,
        "ui_extra_networks": uen,
        "paths": paths,
        "devices": devices,
    }
    pkg = types.ModuleType("modules")
    pkg.__path__ = []
    for name, mod in mods.items():
        setattr(pkg, name, mod)
    return {"modules": pkg} | {f"modules.{k}": v for k, v in mods.items()}


def _set_name(self, name):
    self.name = name
