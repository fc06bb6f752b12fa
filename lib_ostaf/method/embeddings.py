"""Token embeddings of implanted objects: splicing, portable files, A1111 bundles.

A new token (``<mug1>``) is one learned vector per text encoder: SD1/SD2 one
``[n, width]`` tensor, SDXL a CLIP-L and a CLIP-G tensor. We never add the token to the
host's tokenizer: :class:`ClipText` tokenizes the prompt around the tokens and *splices* the
vectors into the text encoder's input embeddings at their positions (as A1111 and ComfyUI
do), so the model is never modified, gradients reach the vectors, and the EOS position that
CLIP pools stays where it is (diffusers' ``load_textual_inversion`` appends new ids above
EOS, which legacy CLIP configs with ``eos_token_id == 2`` then pool instead of EOS).

Files (docs/file-format.md):

* portable: ``{"emb_params": [n, w]}`` (SD1/SD2, as kohya's TI trainer) or
  ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (SDXL) — A1111, ComfyUI, diffusers;
* A1111 bundle: ``bundle_emb.<token>.<key>`` tensors added to a copy of the LoRA file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from lib_ostaf.errors import AdapterFileError, IncompatibleModelError, InputError
from lib_ostaf.files.atomic import atomic_write
from lib_ostaf.files.safetensors_read import check_finite_tensors, load_tensors, open_checked
from lib_ostaf.method.host import Embeddings, TokenVectors

EMBEDDING_SUFFIX = ".safetensors"
EMBEDDINGS_FOLDER = ".embeddings"  # an adapter's tokens: <name>.embeddings/<token>.safetensors
BUNDLE_PREFIX = "bundle_emb."
# A token is a word (letters, digits, _ -), optionally in angle brackets: mug1, <mug1>.
# No '.', ':' or spaces: A1111 splits bundle keys on '.', prompts on ':' and spaces.
TOKEN_RE = re.compile(r"^(<)?([A-Za-z0-9_][A-Za-z0-9_\-]{0,38})(?(1)>)$")


def portable_keys(family: str) -> tuple[str, ...]:
    """Keys of a portable embedding file: SD1/SD2 ``emb_params``, SDXL ``clip_l``+``clip_g``."""
    return ("clip_l", "clip_g") if family == "sdxl" else ("emb_params",)


def validate_token(token: object) -> str:
    """``token`` if it is a valid new word (``mug1`` or ``<mug1>``), else InputError."""
    if not isinstance(token, str) or not token.strip():
        raise InputError("a token is empty; give a new word such as <mug1>")
    if not TOKEN_RE.match(token):
        raise InputError(
            f"token {token!r} must be one word of letters, digits, _ or - (at most 39), "
            "optionally in angle brackets, e.g. <mug1>"
        )
    return token


def file_stem(token: str) -> str:
    """File name stem of a token's embedding (``<mug1>`` → ``mug1``: no ``<>`` on Windows)."""
    return validate_token(token).strip("<>")


def check_new_tokens(tokens: Sequence[str], encoders: Sequence[Any]) -> list[str]:
    """Validate tokens: well-formed, distinct (case-insensitive, as CLIP lowercases) and
    absent from every tokenizer's vocabulary. Returns them unchanged."""
    out = [validate_token(t) for t in tokens]
    seen: dict[str, str] = {}
    for t in out:
        for key in (t.lower(), "stem:" + file_stem(t).lower()):
            if key in seen:
                raise InputError(
                    f"duplicate token {t!r} (same as {seen[key]!r}); each object needs its own"
                )
            seen[key] = t
    for t in out:
        for enc in encoders:
            if enc.has_token(t):
                raise InputError(
                    f"token {t!r} already exists in the tokenizer's vocabulary; choose a new "
                    "word (e.g. add a digit or angle brackets: <mug1>)"
                )
    return out


# --------------------------------------------------------------------------- splicing


class ClipText:
    """A transformers CLIP text encoder + tokenizer that splices vectors for new tokens.

    ``key`` names the encoder in embedding files (``clip_l`` / ``clip_g``). Implements the
    ``TextEncoder`` protocol of :mod:`lib_ostaf.method.host`.
    """

    def __init__(self, tokenizer: Any, model: nn.Module, key: str) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.key = key
        self.width = int(model.get_input_embeddings().embedding_dim)
        proj = getattr(model, "text_projection", None)
        self.projection_dim: int | None = int(proj.out_features) if proj is not None else None
        self.max_length = int(tokenizer.model_max_length)

    def has_token(self, token: str) -> bool:
        vocab = self.tokenizer.get_vocab()
        low = token.lower()
        return any(v in vocab for v in (token, low, low + "</w>"))

    def word_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def word_vectors(self, text: str) -> torch.Tensor:
        """The input-embedding rows of ``text``'s tokens, ``[n_tokens, width]`` (detached)."""
        ids = self.word_ids(text)
        if not ids:
            raise InputError(f"{text!r} has no tokens")
        table = self.model.get_input_embeddings().weight
        return table[torch.tensor(ids, device=table.device)].detach().float().cpu()

    def input_ids(
        self, prompt: str, sizes: Mapping[str, int]
    ) -> tuple[torch.Tensor, list[tuple[int, str, int]]]:
        """Ids padded as the pipelines do, and the slots ``(position, token, vector index)``.

        Text between tokens is tokenized piecewise, exactly as a tokenizer with the tokens
        added would. Slots hold the BOS id (never EOS, never above it) and are overwritten.
        """
        tok = self.tokenizer
        bos, eos = tok.bos_token_id, tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        body: list[int] = []
        slots: list[tuple[int, str, int]] = []
        for piece, token in _split(prompt, list(sizes)):
            if token is None:
                body.extend(self.word_ids(piece))
            else:
                for j in range(sizes[token]):
                    slots.append((1 + len(body), token, j))
                    body.append(bos)
        body = body[: self.max_length - 2]
        slots = [s for s in slots if s[0] < self.max_length - 1]
        ids = [bos, *body, eos]
        ids += [pad] * (self.max_length - len(ids))
        return torch.tensor([ids]), slots

    def run(
        self,
        prompt: str,
        vectors: TokenVectors | None = None,
        *,
        output_hidden_states: bool = False,
    ) -> Any:
        """The text encoder's output for ``prompt`` with ``vectors`` spliced in (differentiable
        in the vectors; the encoder's own weights are used as they are)."""
        vectors = dict(vectors or {})
        for token, v in vectors.items():
            if v.dim() != 2 or v.shape[-1] != self.width:
                raise IncompatibleModelError(
                    f"embedding of {token} has shape {list(v.shape)}; this text encoder "
                    f"({self.key}) needs [n, {self.width}]"
                )
        ids, slots = self.input_ids(prompt, {t: v.shape[0] for t, v in vectors.items()})
        device = self.model.get_input_embeddings().weight.device
        with _splice(self.model.get_input_embeddings(), slots, vectors):
            return self.model(ids.to(device), output_hidden_states=output_hidden_states)

    def pooled(
        self, prompt: str, vectors: TokenVectors | None = None, *, project: bool = True
    ) -> torch.Tensor:
        """The EOS (pooled) feature ``[width]``, through the encoder's projection if it has one
        and ``project``."""
        out = self.run(prompt, vectors)
        if project and self.projection_dim is not None:
            return out.text_embeds[0]
        return out.pooler_output[0]


def _split(prompt: str, tokens: Sequence[str]) -> Iterator[tuple[str, str | None]]:
    """``prompt`` as (text, None) and (matched text, token) pieces; longest token first,
    case-insensitive (CLIP lowercases prompts)."""
    if not tokens:
        yield prompt, None
        return
    canonical = {t.lower(): t for t in tokens}
    alternatives = sorted(canonical, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(t) for t in alternatives), re.IGNORECASE)
    pos = 0
    for m in pattern.finditer(prompt):
        yield prompt[pos : m.start()], None
        yield m.group(0), canonical[m.group(0).lower()]
        pos = m.end()
    yield prompt[pos:], None


@contextmanager
def _splice(
    embedding: nn.Module, slots: Sequence[tuple[int, str, int]], vectors: TokenVectors
) -> Iterator[None]:
    """While active, the token embedding's output rows at ``slots`` are the given vectors."""
    if not slots:
        yield
        return
    positions = torch.tensor([p for p, _, _ in slots])

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
        rows = torch.stack([vectors[t][j] for _, t, j in slots]).to(output.device, output.dtype)
        output = output.clone()
        output[:, positions.to(output.device)] = rows
        return output

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------- files


def embedding_state_dict(vectors: Sequence[torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Portable embedding tensors of one token (float32, contiguous, CPU)."""
    keys = portable_keys(family)
    if len(vectors) != len(keys):
        raise InputError(
            f"{family} embeddings need {len(keys)} tensor(s) ({', '.join(keys)}), "
            f"got {len(vectors)}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, v in zip(keys, vectors, strict=True):
        v = v.detach().float().cpu()
        if v.dim() == 1:
            v = v[None]
        if v.dim() != 2 or v.numel() == 0 or not bool(torch.isfinite(v).all()):
            raise InputError(f"embedding {key} must be a finite [n, width] tensor")
        out[key] = v.clone(memory_format=torch.contiguous_format)
    if family == "sdxl" and out["clip_l"].shape[0] != out["clip_g"].shape[0]:
        raise InputError("clip_l and clip_g must have the same number of vectors")
    return out


def save_embedding(
    path: str | Path,
    vectors: Sequence[torch.Tensor],
    family: str,
    *,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a portable embedding ``.safetensors`` atomically (existing files refused)."""
    path = Path(path)
    if not path.name.endswith(EMBEDDING_SUFFIX):
        raise InputError(f"{path.name!r} must end with {EMBEDDING_SUFFIX}")
    state = embedding_state_dict(vectors, family)
    md = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, safetensors.torch.save(state, md), overwrite=overwrite)


def vectors_from_state(
    state: Mapping[str, torch.Tensor], family: str | None, where: str
) -> tuple[torch.Tensor, ...]:
    """Per-encoder vectors from a portable or A1111 embedding dict.

    Accepts ``emb_params`` / ``string_to_param.*`` / any single tensor (SD1/SD2) and
    ``clip_l`` + ``clip_g`` (SDXL). ``family`` None: guessed from the keys.
    """
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if "clip_g" in tensors:
        if family not in (None, "sdxl"):
            raise IncompatibleModelError(
                f"{where}: an SDXL embedding (clip_l + clip_g) on {family}"
            )
        if "clip_l" not in tensors:
            raise AdapterFileError(f"{where}: SDXL embedding has clip_g but no clip_l")
        found = (tensors["clip_l"], tensors["clip_g"])
    else:
        if family == "sdxl":
            raise IncompatibleModelError(f"{where}: an SD1/SD2 embedding cannot be used with SDXL")
        main = [k for k in tensors if not k.endswith("_out")]  # OneTrainer's optional clip_l_out
        if len(main) != 1:
            raise AdapterFileError(
                f"{where}: expected emb_params, string_to_param.* or clip_l + clip_g, "
                f"found {sorted(tensors)}"
            )
        found = (tensors[main[0]],)
    out = []
    for v in found:
        v = v.detach().float()
        if v.dim() == 1:
            v = v[None]
        if v.dim() != 2:
            raise AdapterFileError(f"{where}: embedding tensor has shape {list(v.shape)}")
        out.append(v)
    return tuple(out)


def load_embedding(
    path: str | Path, family: str | None = None
) -> tuple[str, tuple[torch.Tensor, ...]]:
    """(token, vectors) of a portable ``.safetensors`` embedding. The token is the file's
    ``ostaf.token`` metadata when present, else its stem (A1111's rule)."""
    path, header = open_checked(path, EMBEDDING_SUFFIX)
    tensors = load_tensors(path)
    check_finite_tensors(path, tensors)
    token = header.metadata.get("ostaf.token") or path.name[: -len(EMBEDDING_SUFFIX)]
    return token, vectors_from_state(tensors, family, str(path))


def bundle_state_dict(embeddings: Embeddings, family: str) -> dict[str, torch.Tensor]:
    """``bundle_emb.<token>.<key>`` tensors, A1111's embeddings-inside-a-LoRA convention."""
    out: dict[str, torch.Tensor] = {}
    for token, vectors in embeddings.items():
        validate_token(token)
        for key, v in embedding_state_dict(vectors, family).items():
            out[f"{BUNDLE_PREFIX}{token}.{key}"] = v
    return out


def check_embeddings(embeddings: Embeddings, widths: Sequence[int], where: str = "") -> None:
    """Every token has one ``[n, width]`` tensor per text encoder of the model."""
    for token, vectors in embeddings.items():
        if len(vectors) != len(widths):
            raise IncompatibleModelError(
                f"{where}{token}: {len(vectors)} embedding tensor(s) for a model with "
                f"{len(widths)} text encoder(s)"
            )
        for v, w in zip(vectors, widths, strict=True):
            if v.dim() != 2 or v.shape[-1] != w:
                raise IncompatibleModelError(
                    f"{where}{token}: embedding shape {list(v.shape)}, the model needs [n, {w}]"
                )


def embedding_files(adapter: Any) -> dict[str, Path]:
    """token → portable embedding file of an adapter (an ``AdapterFile``) that keeps its
    tokens beside it; ``{}`` for an adapter without tokens or with ``bundle_emb.*`` inside.

    A token listed in ``ostaf.embeddings`` (paths relative to the adapter's folder) is that
    file, else ``<name>.embeddings/<token stem>.safetensors``; a token found at neither
    raises AdapterFileError naming both paths. Without a listing, every file in
    ``<name>.embeddings/`` (the token is its ``ostaf.token``, else its stem).
    """
    md = adapter.metadata
    if adapter.embeddings or (md.get("ostaf.method") != "object" and "ostaf.embeddings" not in md):
        return {}
    folder = adapter.path.parent
    default = folder / (adapter.name + EMBEDDINGS_FOLDER)
    try:
        listed = json.loads(md.get("ostaf.embeddings", "{}"))
    except ValueError:
        listed = {}
    out: dict[str, Path] = {}
    for token, rel in listed.items() if isinstance(listed, dict) else ():
        candidates = [folder / str(rel)]
        with suppress(InputError):  # a malformed token has no default file name
            candidates.append(default / (file_stem(token) + EMBEDDING_SUFFIX))
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise AdapterFileError(
                f"{adapter.name}: the embedding of token {token} is missing; looked for "
                + " and ".join(str(p) for p in dict.fromkeys(candidates))
            )
        out[token] = found
    if not out:
        for path in sorted(default.glob("*" + EMBEDDING_SUFFIX)) if default.is_dir() else []:
            _, header = open_checked(path, EMBEDDING_SUFFIX)
            out[header.metadata.get("ostaf.token") or path.name[: -len(EMBEDDING_SUFFIX)]] = path
    if not out:
        raise AdapterFileError(
            f"{adapter.name} is an object adapter but its token embeddings are missing; "
            f"looked for {default / ('*' + EMBEDDING_SUFFIX)}"
        )
    return out


def adapter_embeddings(
    adapter: Any, family: str | None = None
) -> dict[str, tuple[torch.Tensor, ...]]:
    """The token embeddings that belong to an adapter (an ``AdapterFile``): an object
    adapter's tokens, or an attribute adapter's learned placeholder.

    ``bundle_emb.*`` inside the file, else the files of :func:`embedding_files` (a missing
    one raises AdapterFileError naming the path). A non-object adapter has none (``{}``).
    """
    family = family or adapter.family
    if adapter.embeddings:
        return {
            token: vectors_from_state(state, family, f"{adapter.path} bundle_emb.{token}")
            for token, state in adapter.embeddings.items()
        }
    return {
        token: load_embedding(path, family)[1] for token, path in embedding_files(adapter).items()
    }


def scaled_embeddings(
    adapter: Any, vectors: Mapping[str, Sequence[torch.Tensor]], lam: float, encoders: Sequence[Any]
) -> dict[str, tuple[torch.Tensor, ...]]:
    """An attribute adapter's learned placeholder at intensity λ: ``v₀ + λ·(v − v₀)``, where
    ``v₀`` is the host's own vector of the word it started from (``ostaf.token_init``), so
    λ = 0 is that plain word and λ scales the token as it scales ΔW. λ is clamped to [0, 1]
    for the token: an embedding extrapolated past the learned vector leaves the words'
    manifold (measured: the reference colour fell from 0.94 to 0.83 at λ = 1.5), so beyond
    1 only the weights are extrapolated. Object tokens (no ``ostaf.token_init``) are
    returned unchanged."""
    word = adapter.metadata.get("ostaf.token_init")
    if not word or min(max(float(lam), 0.0), 1.0) == 1:
        return {t: tuple(v) for t, v in vectors.items()}
    start = tuple(e.word_vectors(word).mean(0, keepdim=True) for e in encoders)
    return placeholder_at(vectors, dict.fromkeys(vectors, start), lam)


def placeholder_at(
    learned: Mapping[str, Sequence[torch.Tensor]],
    start: Mapping[str, Sequence[torch.Tensor]],
    lam: float,
) -> dict[str, tuple[torch.Tensor, ...]]:
    """``v₀ + λ·(v − v₀)`` per token and text encoder, λ clamped to [0, 1]."""
    t = min(max(float(lam), 0.0), 1.0)
    return {
        k: tuple(s.to(v) + t * (v - s.to(v)) for v, s in zip(vs, start[k], strict=True))
        for k, vs in learned.items()
    }
