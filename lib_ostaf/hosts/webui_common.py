"""What the A1111 and Forge glue share: WebUI textual-inversion ``Embedding`` objects for
object tokens, A1111's embedding database (kept by Forge Classic and reForge), and clearing
the WebUI's cached prompt conditionings.

Both WebUIs splice an ``Embedding``'s ``vec`` into the text encoder's input where its name
occurs in a prompt (``EmbeddingsWithFixes``); SDXL ``vec`` is ``{"clip_l", "clip_g"}`` and
each encoder picks its key. Nothing here imports a WebUI module at import time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lib_ostaf.errors import IncompatibleModelError, InputError


def embedding_db() -> Any | None:
    """A1111's textual-inversion database (``sd_hijack.model_hijack.embedding_db``); Forge
    Classic and reForge keep it, Forge 2 and Neo have none."""
    hijack = sys.modules.get("modules.sd_hijack")
    return getattr(getattr(hijack, "model_hijack", None), "embedding_db", None)


class StandInEmbedding:
    """The fields of the WebUIs' ``Embedding`` class (used when it cannot be imported)."""

    def __init__(self, vec: Any, name: str, step: int | None = None) -> None:
        self.vec, self.name, self.step = vec, name, step
        self.sd_checkpoint = self.sd_checkpoint_name = None
        self.shape: int | None = None
        self.vectors = 0
        self.cached_checksum: str | None = None
        self.filename: str | None = None
        self.hash = self.shorthash = None
        self.optimizer_state_dict = None


def embedding_class(module: str) -> type:
    """The WebUI's ``Embedding`` class from ``module``, or :class:`StandInEmbedding`."""
    try:
        return __import__(module, fromlist=["Embedding"]).Embedding
    except (ImportError, AttributeError):
        return StandInEmbedding


def make_embedding(
    token: str,
    vectors: Sequence[torch.Tensor],
    family: str,
    cls: type = StandInEmbedding,
    *,
    live: bool = False,
    device: torch.device | str | None = None,
) -> Any:
    """An ``Embedding`` named ``token``: SD1/SD2 one ``[n, w]`` tensor, SDXL
    ``{"clip_l", "clip_g"}``. ``live`` keeps the tensors as given (training: gradients flow
    into them); otherwise detached float32 copies on ``device`` (CPU by default)."""
    vecs = list(vectors) if live else [v.detach().float().to(device or "cpu") for v in vectors]
    if family == "sdxl":
        if len(vecs) != 2:
            raise IncompatibleModelError(f"{token}: SDXL needs a CLIP-L and a CLIP-G vector")
        vec: Any = {"clip_l": vecs[0], "clip_g": vecs[1]}
        shape = vecs[0].shape[-1] + vecs[1].shape[-1]
    else:
        if len(vecs) != 1:
            raise IncompatibleModelError(f"{token}: SD1/SD2 needs one vector per token")
        vec = vecs[0]
        shape = vecs[0].shape[-1]
    emb = cls(vec, token)
    emb.shape, emb.vectors = int(shape), int(vecs[0].shape[0])
    emb.cached_checksum = "0000"  # never hash a live tensor (A1111's checksum walks it)
    return emb


class WebuiText:
    """A WebUI text encoder as a ``TextEncoder`` (method/host.py): subclasses give the token
    ids of a text (:meth:`ids`) and its rows of the input-embedding table (:meth:`rows`).
    There is no pooled feature here (``has_pooled``): the prototypical embedding takes it
    from a full CLIPModel's own text tower when its token rows are this encoder's
    (``objects.ClipTower.match``), else the class word is used."""

    key: str
    width: int
    model: torch.nn.Module  # frozen by the trainer
    projection_dim: int | None = None
    has_pooled = False

    def ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def rows(self, text: str) -> torch.Tensor:
        raise NotImplementedError

    def has_token(self, token: str) -> bool:
        return len(self.ids(token)) == 1

    def word_vectors(self, text: str) -> torch.Tensor:
        rows = self.rows(text)
        if rows.shape[0] == 0:
            raise InputError(f"{text!r} has no tokens")
        return rows.detach().float().cpu()

    def pooled(self, prompt: str, vectors: Any = None, *, project: bool = True) -> torch.Tensor:
        raise NotImplementedError("the WebUI path has no pooled CLIP feature (no image tower)")


def wanted_tokens(
    adapters: Sequence[Any], family: str, encoders: Callable[[], Sequence[Any]] | None = None
) -> tuple[dict[str, tuple[Any, Sequence[torch.Tensor]]], list[str]]:
    """The tokens of the planned ``adapters``: token → (adapter, vectors), plus a message
    for each adapter whose embeddings cannot be read (its tokens are skipped; the message,
    which names the missing file, comes once per adapter file in this process). With
    ``encoders`` (the model's text encoders, built on demand), an attribute adapter's
    learned placeholder is scaled by its λ
    (:func:`~lib_ostaf.method.embeddings.scaled_embeddings`)."""
    from lib_ostaf.errors import OstafError
    from lib_ostaf.method.embeddings import adapter_embeddings, scaled_embeddings

    wanted: dict[str, tuple[Any, Sequence[torch.Tensor]]] = {}
    messages: list[str] = []
    for planned in adapters:
        try:
            found = adapter_embeddings(planned.adapter, family)
        except OstafError as e:
            msg = f"OSTAF: {planned.name}: {e}; its tokens are not available."
            if _first_time(planned.adapter, msg):
                messages.append(msg)
            continue
        if found and encoders is not None and planned.adapter.metadata.get("ostaf.token_init"):
            try:
                found = scaled_embeddings(planned.adapter, found, planned.token_weight, encoders())
            except (OstafError, NotImplementedError) as e:
                messages.append(f"OSTAF: {planned.name}: token not scaled by λ ({e}).")
        for token, vectors in found.items():
            wanted[token] = (planned, vectors)
    return wanted, messages


_WARNED: set[tuple[object, str]] = set()  # (adapter file, message) already reported


def _first_time(adapter: Any, message: str) -> bool:
    """True once per adapter file and message in this process: an adapter whose tokens are
    unreadable is reported at its first use, not at every generation (the message names
    the file, and a changed file, new size or mtime, is a new adapter)."""
    key = (getattr(adapter, "identity", None) or str(getattr(adapter, "path", "")), message)
    if key in _WARNED:
        return False
    _WARNED.add(key)
    return True


def clear_cond_cache() -> None:
    """Forget the WebUI's cached prompt conditionings (class-level lists, cleared in place so
    instances aliasing them see it): after retraining, the same prompt must be re-encoded."""
    processing = sys.modules.get("modules.processing")
    if processing is None:
        return
    for cls_name, attrs in (
        ("StableDiffusionProcessing", ("cached_c", "cached_uc")),
        ("StableDiffusionProcessingTxt2Img", ("cached_hr_c", "cached_hr_uc")),
    ):
        cls = getattr(processing, cls_name, None)
        for attr in attrs:
            cache = getattr(cls, attr, None)
            if isinstance(cache, list):
                cache[:] = [None] * len(cache)
