"""Ready to share: one adapter as a folder for a model hub (Hugging Face, Civitai).

The folder holds byte copies of the LoRA and of its token embeddings (same hashes as the
files the author generated with, so Civitai links their images), the A1111 card with the
trigger of every tool in its notes, the card picture and/or a λ sweep, and ``README.md``:
a Hugging Face model card (YAML front matter as diffusers' training scripts write it,
Civitai's AutoV2/AutoV3 hashes, the trigger per tool). Nothing is uploaded: docs/sharing.md.

Everything is checked before anything is written; the files are staged in a temp folder
beside the output and moved in at the end, so a refusal or a failure writes nothing.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from lib_ostaf.errors import InputError
from lib_ostaf.files.adapter_file import AdapterFile, load_adapter
from lib_ostaf.files.atomic import current_umask
from lib_ostaf.files.filenames import ADAPTER_SUFFIX, CARD_SUFFIX, PREVIEW_SUFFIX, validate_name
from lib_ostaf.files.hashes import file_hashes
from lib_ostaf.files.metadata import sd_version_label
from lib_ostaf.files.sidecars import card_bytes
from lib_ostaf.method.embeddings import EMBEDDINGS_FOLDER, embedding_files, file_stem
from lib_ostaf.webui.cards import trigger_forms, trigger_notes
from lib_ostaf.webui.registry import MAX_CARD_BYTES, preferred_weight

MODEL_CARD = "README.md"
SWEEP_SUFFIX = ".sweep.png"
# Hugging Face ids of each family's reference checkpoint (base_model must be a hub id)
HUB_BASE_MODELS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1-base",
    "sd2-v": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
# the base models' licenses: SD1 CreativeML OpenRAIL-M, SD2 and SDXL CreativeML OpenRAIL++-M
LICENSES = {"sd1": "creativeml-openrail-m", "sd2": "openrail++", "sdxl": "openrail++"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Preview:
    """A picture of the model card: its file in the share folder and the prompt it shows."""

    file: str
    prompt: str
    caption: str


@dataclass
class SharePlan:
    """What :func:`write_share` will write, every input already checked."""

    adapter: AdapterFile
    out_dir: Path
    base_model: str
    embeddings: dict[str, Path]  # token → source file
    card: dict[str, object]  # the source's A1111 card (or {})
    overwrite: bool
    previews: list[Preview] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.adapter.name

    @property
    def tokens(self) -> list[str]:
        return list(self.embeddings) or list(self.adapter.embeddings)


def share_adapter(
    adapters_dir: str | Path,
    name: str,
    out_dir: str | Path,
    *,
    sweep: Image.Image | None = None,
    sweep_prompts: Sequence[str] = (),
    sweep_lambdas: Sequence[float] = (),
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write adapter ``name`` of ``adapters_dir`` into ``out_dir``, ready to upload; returns
    ``out_dir``. ``sweep``: a λ-sweep picture (rows ``sweep_prompts``, columns
    ``sweep_lambdas``) shown beside the card picture. ``base_model``: the hub id for the
    card (default: the file's, if it is a hub id, else the family's reference model). An
    existing non-empty ``out_dir`` is refused unless ``overwrite`` (which replaces only the
    files written here). Bad inputs raise InputError / AdapterFileError; nothing is written."""
    plan = plan_share(adapters_dir, name, out_dir, base_model=base_model, overwrite=overwrite)
    return write_share(plan, sweep=sweep, sweep_prompts=sweep_prompts, sweep_lambdas=sweep_lambdas)


def plan_share(
    adapters_dir: str | Path,
    name: str,
    out_dir: str | Path,
    *,
    base_model: str | None = None,
    overwrite: bool = False,
) -> SharePlan:
    """Check every input of a share (cheap: run it before rendering a sweep)."""
    folder = Path(adapters_dir).expanduser()
    path = folder / (validate_name(name) + ADAPTER_SUFFIX)
    if not path.is_file():
        raise InputError(f"adapter {name!r} not found in {folder} (no {path.name}).")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; give a folder to share into.")
    if out.resolve() == folder.resolve():
        raise InputError(f"{out} is the adapters folder itself; share into another folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(
            f"{out} is not empty; choose an empty or new folder, or overwrite. Nothing was written."
        )
    adapter = load_adapter(path)
    family = adapter.family
    if family is None and not base_model:
        raise InputError(
            f"{name}: the file does not say whether it is SD1, SD2 or SDXL; give the base "
            "model's Hugging Face id."
        )
    embeddings = embedding_files(adapter)  # a missing file: an error naming it
    for token in embeddings:
        file_stem(token)  # its file name in the share (a malformed token: InputError)
    return SharePlan(
        adapter=adapter,
        out_dir=out,
        base_model=base_model or hub_base_model(adapter),
        embeddings=embeddings,
        card=_read_card(path.with_name(name + CARD_SUFFIX)),
        overwrite=overwrite,
    )


def hub_base_model(adapter: AdapterFile) -> str:
    """``ostaf.base_model`` when it is a hub id (``owner/name``), else the family's model."""
    own = adapter.metadata.get("ostaf.base_model", "")
    if _HUB_ID.fullmatch(own):
        return own
    v = adapter.family == "sd2" and adapter.prediction_type == "v_prediction"
    return HUB_BASE_MODELS["sd2-v" if v else str(adapter.family)]


def civitai_hashes(path: str | Path) -> dict[str, str]:
    """Civitai's AutoV2 (SHA-256 of the whole file; Civitai shows the first 10 hex digits)
    and AutoV3 (SHA-256 of the tensor bytes = ``sshs_model_hash``; A1111's infotext shows
    its first 12), computed from the file's bytes."""
    h = file_hashes(path)
    return {
        "autov2": h["sha256"],
        "autov2_short": h["sha256"][:10].upper(),
        "autov3": h["addnet"],
        "a1111_short": h["short"],
    }


def preview_prompt(adapter: AdapterFile) -> str:
    """The prompt the adapter was trained (and its card picture rendered) with."""
    tokens: object = []
    with contextlib.suppress(ValueError):
        tokens = json.loads(adapter.metadata.get("ostaf.tokens", "[]"))
    words = [str(t) for t in tokens] if isinstance(tokens, list) else []
    prompt = adapter.metadata.get("ostaf.prompt", "").replace("{tokens}", " and ".join(words))
    return prompt or adapter.metadata.get("modelspec.trigger_phrase", "") or adapter.name


def write_share(
    plan: SharePlan,
    *,
    sweep: Image.Image | None = None,
    sweep_prompts: Sequence[str] = (),
    sweep_lambdas: Sequence[float] = (),
) -> Path:
    """Write a planned share (see :func:`share_adapter`); returns the folder."""
    name, src = plan.name, plan.adapter.path
    files: dict[str, Path | bytes] = {name + ADAPTER_SUFFIX: src}
    for token, path in plan.embeddings.items():
        files[f"{name}{EMBEDDINGS_FOLDER}/{file_stem(token)}{ADAPTER_SUFFIX}"] = path
    picture = src.with_name(name + PREVIEW_SUFFIX)
    previews = []
    if picture.is_file():
        files[picture.name] = picture
        lam = f"λ {preferred_weight(plan.card) or plan.adapter.default_lambda:g}"
        previews.append(Preview(picture.name, preview_prompt(plan.adapter), lam))
    if sweep is not None:
        buf = io.BytesIO()
        sweep.convert("RGB").save(buf, format="PNG")
        files[name + SWEEP_SUFFIX] = buf.getvalue()
        prompt = " / ".join(sweep_prompts) or preview_prompt(plan.adapter)
        lams = ", ".join(f"{x:g}" for x in sweep_lambdas)
        previews.append(Preview(name + SWEEP_SUFFIX, prompt, f"λ sweep {lams}".strip()))
    plan = replace(plan, previews=previews)
    files[name + CARD_SUFFIX] = _a1111_card(plan)
    files[MODEL_CARD] = model_card(plan).encode("utf-8")
    _publish(files, plan.out_dir, overwrite=plan.overwrite)
    return plan.out_dir


def _read_card(path: Path) -> dict[str, object]:
    with contextlib.suppress(OSError, ValueError):
        if path.is_file() and path.stat().st_size <= MAX_CARD_BYTES:
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
    return {}


def _a1111_card(plan: SharePlan) -> bytes:
    """The source's A1111 card (or one from the metadata), the triggers in its notes."""
    md, card = plan.adapter.metadata, plan.card
    notes = [str(card.get("notes", "") or ""), trigger_notes(plan.tokens, plan.name)]
    weight = preferred_weight(card)
    return card_bytes(
        preferred_weight=weight if weight is not None else plan.adapter.default_lambda,
        activation_text=str(card.get("activation text") or md.get("modelspec.trigger_phrase", "")),
        description=str(card.get("description") or md.get("modelspec.description", "")),
        sd_version=sd_version_label(plan.adapter.family),
        notes="\n".join(n for n in notes if n),
    )


# --------------------------------------------------------------------------- model card


def yaml_str(text: str) -> str:
    """``text`` as a YAML double-quoted scalar (JSON's escapes, plus the characters YAML
    does not allow unescaped: DEL, C1 controls, line/paragraph separators, surrogates)."""
    out = json.dumps(str(text), ensure_ascii=False)
    return "".join(
        c
        if c in "\t\n\r" or " " <= c <= "~" or "\xa0" <= c < "\u2028" or _ok_wide(c)
        else f"\\u{ord(c):04x}"
        for c in out
    )


def _ok_wide(c: str) -> bool:
    return "\u2029" < c < "\ud800" or "\ue000" <= c <= "\ufffd" or c >= "\U00010000"


def front_matter(plan: SharePlan) -> str:
    """The model card's YAML header: base model, license, trigger, tags, widget."""
    family = plan.adapter.family
    trigger = ", ".join(plan.tokens) or plan.adapter.metadata.get("modelspec.trigger_phrase", "")
    tags = ["text-to-image", "lora", "diffusers", "template:sd-lora", "ostaf"]
    tags.insert(3, "stable-diffusion-xl" if family == "sdxl" else "stable-diffusion")
    lines = [
        "---",
        f"base_model: {yaml_str(plan.base_model)}",
        f"license: {LICENSES.get(str(family), 'other')}",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
    ]
    if trigger:
        lines.append(f"instance_prompt: {yaml_str(trigger)}")
    lines += ["tags:", *(f"- {yaml_str(t)}" for t in tags)]
    if plan.previews:
        lines.append("widget:")
        for p in plan.previews:
            lines += [f"- text: {yaml_str(p.prompt)}", "  output:", f"    url: {_url(p.file)}"]
    return "\n".join([*lines, "---", ""])


def _url(file: str) -> str:
    return yaml_str(quote(file))


def model_card(plan: SharePlan) -> str:
    """``README.md``: the front matter, then what a reader needs to use the adapter."""
    a, name = plan.adapter, plan.name
    md = a.metadata
    title = md.get("modelspec.title", name)
    parts = [
        front_matter(plan),
        f"# {_md(title)}\n",
        f"An OSTAF {_md(md.get('ostaf.method', 'LoRA'))} adapter for "
        f"{sd_version_label(a.family)} (`{plan.base_model}`), made with sd-webui-ostaf from "
        f"one reference image. A plain kohya LoRA: every LoRA loader reads `{name}.safetensors`.\n",
    ]
    parts += [
        f"![{p.caption}]({quote(p.file)})\n\n*{p.caption}:* `{p.prompt}`\n" for p in plan.previews
    ]
    parts += [_usage_section(plan), _diffusers_section(plan), _files_section(plan)]
    parts.append(_hash_section(a.path))
    trained = md.get("ostaf.base_model", "")
    if trained:
        version = md.get("ostaf.version", "")
        parts.append(f"Trained on the checkpoint `{trained}` with OSTAF {_md(version)}.\n")
    return "\n".join(parts)


def _md(text: str) -> str:
    """Prose for Markdown: ``<mug1>`` would be read as an HTML tag and vanish."""
    return html.escape(str(text), quote=False)


def _usage_section(plan: SharePlan) -> str:
    a, name = plan.adapter, plan.name
    hint = (
        a.metadata.get("modelspec.usage_hint") or f"LoRA weight (λ), default {a.default_lambda:g}."
    )
    lines = ["## Use\n", _md(hint), ""]
    if plan.tokens:
        lines += ["| tool | load | write in the prompt |", "|---|---|---|"]
        for token in plan.tokens:
            forms = trigger_forms(token, name)
            lines += [f"| {tool} | {load} | `{word}` |" for tool, load, word in forms]
        lines.append("")
        lines.append(
            "Load the LoRA as usual (`<lora:…:λ>`, ComfyUI's LoraLoader, diffusers' "
            "`load_lora_weights`) and each token's embedding beside it: the tokens are not "
            "in the LoRA file."
        )
    else:
        trigger = a.metadata.get("modelspec.trigger_phrase", "")
        lines.append(f"Trigger word: `{trigger}` (the same in every tool)." if trigger else "")
    return "\n".join(lines) + "\n"


def _diffusers_section(plan: SharePlan) -> str:
    name, sdxl = plan.name, plan.adapter.family == "sdxl"
    lines = [
        "## diffusers\n",
        "```python",
        "import torch",
        "from diffusers import AutoPipelineForText2Image",
        "from safetensors.torch import load_file",
        "",
        f'pipe = AutoPipelineForText2Image.from_pretrained("{plan.base_model}", '
        'torch_dtype=torch.float16).to("cuda")',
        f'pipe.load_lora_weights(".", weight_name="{name}.safetensors")  # or the repo id',
        f"pipe.fuse_lora(lora_scale={plan.adapter.default_lambda:g})  # λ",
    ]
    encoders = [("clip_l", ""), ("clip_g", "_2")] if sdxl else [("emb_params", "")]
    for token in plan.tokens if plan.embeddings else ():
        lines.append(f'emb = load_file("{name}{EMBEDDINGS_FOLDER}/{file_stem(token)}.safetensors")')
        lines += [
            f'pipe.load_textual_inversion(emb["{key}"], token="{token}", '
            f"text_encoder=pipe.text_encoder{i}, tokenizer=pipe.tokenizer{i})"
            for key, i in encoders
        ]
    prompt = json.dumps(preview_prompt(plan.adapter), ensure_ascii=False)
    lines += [f"image = pipe({prompt}).images[0]", "```", ""]
    return "\n".join(lines)


def _files_section(plan: SharePlan) -> str:
    name = plan.name
    lines = ["## Files\n", f"- `{name}.safetensors`: the LoRA (kohya keys, ModelSpec metadata)"]
    for token in plan.tokens if plan.embeddings else ():
        lines.append(f"- `{name}{EMBEDDINGS_FOLDER}/{file_stem(token)}.safetensors`: `{token}`")
    lines.append(f"- `{name}.json`: the A1111 / Forge card (activation text, preferred weight)")
    lines += [f"- `{p.file}`: {p.caption}" for p in plan.previews]
    return "\n".join(lines) + "\n"


def _hash_section(path: Path) -> str:
    h = civitai_hashes(path)
    return "\n".join(
        [
            "## Hashes\n",
            "| hash | value |",
            "|---|---|",
            f"| AutoV2 (Civitai: SHA-256 of the file) | `{h['autov2_short']}` (`{h['autov2']}`) |",
            f"| AutoV3 (Civitai) = `sshs_model_hash` | `{h['autov3']}` |",
            f"| A1111 / Forge infotext (AutoV3's first 12) | `{h['a1111_short']}` |",
            "",
        ]
    )


# --------------------------------------------------------------------------- writing


def _publish(files: dict[str, Path | bytes], out: Path, *, overwrite: bool) -> None:
    """Stage ``files`` (relative name → source file or bytes) beside ``out``, then move them
    in: a new folder by one rename, an existing one file by file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.share-"))
    try:
        os.chmod(stage, 0o777 & ~current_umask())  # mkdtemp's 0700 would become the folder's mode
        for rel, source in files.items():
            target = stage / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, bytes):
                target.write_bytes(source)
            else:
                shutil.copyfile(source, target)
        if not out.exists():
            os.rename(stage, out)
            return
        if any(out.iterdir()) and not overwrite:  # filled meanwhile
            raise InputError(f"{out} is not empty; nothing was written.")
        for rel in files:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, out / rel)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
