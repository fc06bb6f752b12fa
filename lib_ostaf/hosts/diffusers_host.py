"""Standalone host on diffusers: the embedded tiny model or a user's checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lib_ostaf.errors import InputError, OstafError
from lib_ostaf.files.naming import NATIVE_RESOLUTION, inspect_unet
from lib_ostaf.hosts.devices import check_resolution, choose_device, choose_dtype
from lib_ostaf.method.embeddings import ClipText, check_embeddings
from lib_ostaf.method.host import Embeddings
from lib_ostaf.method.images import square
from lib_ostaf.method.offsets import WeightPatcher, check_lambda
from lib_ostaf.world import tiny

DEFAULT_MODEL = "tiny"  # = "tiny-world", the attribute-world model (docs/results.md)
TINY = ("tiny-sd1", "tiny-sdxl")  # random-weight stand-ins with real SD structure (tests)


class DiffusersHost:
    """A diffusers SD1/SD2/SDXL pipeline seen through the :class:`~.base.Host` protocol."""

    def __init__(self, pipe: Any, *, base_model_name: str, resolution: int | None = None) -> None:
        self.pipe = pipe
        self.unet = pipe.unet
        self.info = inspect_unet(self.unet)
        self.family = self.info.family
        self.is_sdxl = self.family == "sdxl"
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        betas = _betas(pipe.scheduler.config)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).float()
        self.device = self.unet.device
        self.dtype = self.unet.dtype
        self.base_model_name = base_model_name
        native = int(self.unet.config.sample_size * pipe.vae_scale_factor)
        self.resolution = resolution or native or NATIVE_RESOLUTION[self.family]
        self.patcher = WeightPatcher(_linear_modules(self.unet))
        self.text_encoders = [ClipText(pipe.tokenizer, pipe.text_encoder, "clip_l")]
        if self.is_sdxl:
            self.text_encoders.append(ClipText(pipe.tokenizer_2, pipe.text_encoder_2, "clip_g"))

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        *,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        resolution: int | None = None,
    ) -> DiffusersHost:
        """``None``/"tiny"/"tiny-world" → the embedded attribute-world model; "tiny-sd1" /
        "tiny-sdxl" → random-weight stand-ins with real SD structure (tests); a folder →
        ``from_pretrained``; a ``.safetensors`` file → ``from_single_file``.

        ``device``: auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps or cpu; ``dtype``: auto
        (half on a GPU, fp32 on the CPU), fp32, fp16 or bf16 (:mod:`lib_ostaf.hosts.devices`). The
        embedded tiny models stay on the CPU under ``auto`` (they are too small to gain from
        a GPU, and the CPU keeps them deterministic); name a device to move them.
        ``resolution``: training and generation size in pixels (None: the model's own).
        """
        resolution = check_resolution(resolution)
        if is_tiny(model) and (device is None or str(device).strip().lower() == "auto"):
            device = "cpu"
        where = choose_device(device)
        torch_dtype = choose_dtype(dtype, where)
        place = {"device": where, "dtype": torch_dtype, "resolution": resolution}
        if model is None or str(model) in (DEFAULT_MODEL, "tiny-world"):
            parts = tiny.components("sd1", world=True)
            return cls.from_components(parts, name="tiny-world", **place)
        if str(model) in TINY:
            family = "sdxl" if str(model) == "tiny-sdxl" else "sd1"
            return cls.from_components(tiny.components(family), name=f"tiny-{family}", **place)
        path = Path(model)
        if not path.exists():
            raise InputError(f"model not found: {path}")
        pipe_cls = _pipeline_class(path)
        try:
            if path.is_dir():
                pipe = pipe_cls.from_pretrained(
                    str(path), safety_checker=None, torch_dtype=torch_dtype
                )
            elif path.suffix == ".safetensors":
                pipe = pipe_cls.from_single_file(str(path), torch_dtype=torch_dtype)
            else:
                raise InputError("checkpoints must be a diffusers folder or a .safetensors file")
        except OstafError:
            raise
        except Exception as exc:  # diffusers raises many types; surface one clear message
            raise InputError(f"could not load the model {path.name}: {exc}") from exc
        pipe.to(where, torch_dtype)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, base_model_name=path.stem, resolution=resolution)

    @classmethod
    def from_components(
        cls,
        parts: dict[str, Any],
        *,
        name: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        resolution: int | None = None,
    ) -> DiffusersHost:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if "text_encoder_2" in parts:
            pipe = StableDiffusionXLPipeline(**parts)
        else:
            pipe = StableDiffusionPipeline(
                **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        if torch.device(device) != torch.device("cpu") or dtype != torch.float32:
            pipe.to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, base_model_name=name, resolution=resolution)

    # -- Host protocol --------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        image = square(image, self.resolution)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        vae = self.pipe.vae
        # An fp16 VAE can overflow to NaN (SDXL's does); diffusers' pipelines upcast it to
        # decode when its config says so, and so do we to encode (the views, once per run).
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        x = x.permute(2, 0, 1)[None].to(self.device, torch.float32 if upcast else vae.dtype)
        if upcast:
            vae.to(torch.float32)
        try:
            latents = vae.encode(x).latent_dist.mean
        finally:
            if upcast:
                vae.to(torch.float16)
        shift = getattr(self.pipe.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.pipe.vae.config.scaling_factor).to(self.dtype)

    def encode_prompt(self, prompt: str, embeddings: Embeddings | None = None) -> dict[str, Any]:
        if embeddings:
            return self._encode_spliced(prompt, embeddings)
        with torch.no_grad():
            return self._encode_pipe(prompt)

    def _encode_pipe(self, prompt: str) -> dict[str, Any]:
        if not self.is_sdxl:
            embeds, _ = self.pipe.encode_prompt(prompt, self.device, 1, False)
            return {"encoder_hidden_states": embeds}
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt, device=self.device, do_classifier_free_guidance=False
        )
        return self._sdxl_cond(embeds, pooled)

    def _sdxl_cond(self, embeds: torch.Tensor, pooled: torch.Tensor) -> dict[str, Any]:
        size = (self.resolution, self.resolution)
        time_ids = self.pipe._get_add_time_ids(
            size,
            (0, 0),
            size,
            dtype=embeds.dtype,
            text_encoder_projection_dim=self.pipe.text_encoder_2.config.projection_dim,
        ).to(self.device)
        return {
            "encoder_hidden_states": embeds,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
        }

    def _encode_spliced(self, prompt: str, embeddings: Embeddings) -> dict[str, Any]:
        """What ``pipe.encode_prompt`` computes (SD1: last hidden state; SDXL: penultimate
        hidden states of both encoders + CLIP-G's projected pooled output), with the new
        tokens' vectors spliced into the input embeddings."""
        check_embeddings(embeddings, [enc.width for enc in self.text_encoders])
        per_encoder = [
            {token: vectors[i] for token, vectors in embeddings.items()}
            for i in range(len(self.text_encoders))
        ]
        if not self.is_sdxl:
            out = self.text_encoders[0].run(prompt, per_encoder[0])
            te_dtype = self.pipe.text_encoder.dtype
            return {"encoder_hidden_states": out.last_hidden_state.to(te_dtype)}
        hidden, pooled = [], None
        for enc, vectors in zip(self.text_encoders, per_encoder, strict=True):
            out = enc.run(prompt, vectors, output_hidden_states=True)
            if enc.projection_dim is not None:
                pooled = out.text_embeds
            hidden.append(out.hidden_states[-2])
        te_dtype = self.pipe.text_encoder_2.dtype
        return self._sdxl_cond(torch.cat(hidden, dim=-1).to(te_dtype), pooled)

    def predict_noise(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]
    ) -> torch.Tensor:
        batch = x_t.shape[0]
        kwargs = {"encoder_hidden_states": cond["encoder_hidden_states"].expand(batch, -1, -1)}
        if "added_cond_kwargs" in cond:
            kwargs["added_cond_kwargs"] = {
                k: v.expand(batch, *v.shape[1:]) for k, v in cond["added_cond_kwargs"].items()
            }
        return self.unet(x_t, t, **kwargs).sample

    # -- generation -----------------------------------------------------------------------
    def apply_adapters(
        self, adapters: Sequence[tuple[Any, float] | tuple[Any, float, Mapping[str, float]]]
    ) -> None:
        """Merge ``[(AdapterFile, λ[, {part: λ_part}]), ...]`` into the UNet:
        W + Σ λ_part·ΔW_part (a part left out takes λ); ``[]`` restores it exactly."""
        from lib_ostaf.method.apply import merge_terms

        terms = []
        for adapter, lam, *parts in adapters:
            weights = {p: check_lambda(w) for p, w in (parts[0] if parts else {}).items()}
            terms += merge_terms(adapter, self.unet, self.info, check_lambda(lam), weights)
        self.patcher.apply(terms)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        *,
        seed: int = 0,
        steps: int = 20,
        guidance: float = 5.0,
        negative_prompt: str = "",
        size: int | None = None,
        embeddings: Embeddings | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> Image.Image:
        """One image. ``embeddings``: new tokens' vectors, spliced where the tokens occur.
        ``on_step(step, total)`` runs before each denoising step (a step schedule)."""
        size = size or self.resolution
        generator = torch.Generator("cpu").manual_seed(int(seed))
        text: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative_prompt or None}
        if embeddings:
            text = self._pipe_embeds(prompt, embeddings, "")
            if negative_prompt:
                text |= self._pipe_embeds(negative_prompt, embeddings, "negative_")
        extra: dict[str, Any] = {}
        if on_step is not None:
            on_step(0, steps)

            def after(_pipe: Any, i: int, _t: Any, kwargs: dict) -> dict:
                if i + 1 < steps:
                    on_step(i + 1, steps)
                return kwargs

            extra["callback_on_step_end"] = after
        out = self.pipe(
            **text,
            **extra,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=generator,
        )
        return out.images[0]

    def _pipe_embeds(self, prompt: str, embeddings: Embeddings, prefix: str) -> dict[str, Any]:
        cond = self._encode_spliced(prompt, embeddings)
        kwargs = {f"{prefix}prompt_embeds": cond["encoder_hidden_states"]}
        if self.is_sdxl:
            kwargs[f"{prefix}pooled_prompt_embeds"] = cond["added_cond_kwargs"]["text_embeds"]
        return kwargs


def is_tiny(model: str | Path | None) -> bool:
    """Whether ``model`` names one of the embedded tiny models (not a file)."""
    return model is None or str(model) in (DEFAULT_MODEL, "tiny-world", *TINY)


def _betas(config: Any) -> torch.Tensor:
    n = config.get("num_train_timesteps", 1000)
    start, end = config.get("beta_start", 0.00085), config.get("beta_end", 0.012)
    schedule = config.get("beta_schedule", "scaled_linear")
    if schedule == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    if schedule == "linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    raise InputError(f"unsupported beta schedule {schedule!r}")


def _linear_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}


def _pipeline_class(path: Path) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise InputError(f"{path} is not a diffusers model folder (no model_index.json)")
        return StableDiffusionXLPipeline if "XL" in index.read_text() else StableDiffusionPipeline
    # Single file: SDXL checkpoints carry the second text encoder under conditioner.embedders.1
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = f.keys()
    except Exception as exc:
        raise InputError(f"cannot read checkpoint {path.name}: {exc}") from None
    is_xl = any(k.startswith("conditioner.embedders.1") for k in keys)
    return StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
