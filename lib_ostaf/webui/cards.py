"""HTML shown by the WebUI glue: card descriptions, the training result card, errors.

Every value that comes from a file or a user is escaped: adapter files are downloaded from
model hubs and their metadata / card text may carry HTML or script.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

from lib_ostaf.files.metadata import sd_version_label
from lib_ostaf.method.embeddings import file_stem
from lib_ostaf.webui.prompt_tags import format_tag
from lib_ostaf.webui.registry import AdapterEntry


def sd_version_name(family: str | None) -> str:
    """A1111's ``SdVersion`` member name for a family (SD1 / SD2 / SDXL / Unknown)."""
    return sd_version_label(family)


def badges(entry: AdapterEntry) -> list[str]:
    out = []
    if entry.method:
        out.append(entry.method)
    if entry.attribute:
        out.append(entry.attribute)
    if entry.family:
        out.append(sd_version_label(entry.family))
    if entry.error:
        out.append("unreadable")
    return out


def card_description(entry: AdapterEntry, *, as_html: bool) -> str:
    """The card text: badges + description. ``as_html``: the WebUI renders it as HTML (then
    we escape); otherwise the WebUI escapes plain text itself."""
    text = entry.description or ""
    if entry.error:
        text = f"{text} [cannot be used: {entry.error}]".strip()
    if not as_html:
        tags = " ".join(f"[{b}]" for b in badges(entry))
        return f"{tags} {text}".strip()
    spans = "".join(f"<span class='ostaf-badge'>{html.escape(b)}</span>" for b in badges(entry))
    return f"{spans} {html.escape(text)}".strip()


def trigger_forms(token: str, name: str) -> list[tuple[str, str, str]]:
    """How each tool is told about an adapter's token and how a prompt names it:
    ``(tool, what to load, what to write)``. The portable file is ``<stem>.safetensors``
    (``<mug1>`` → ``mug1``); tools that take the token from the file name see the stem."""
    stem = file_stem(token)
    file = f"`{stem}.safetensors`"
    return [
        ("A1111 / Forge with sd-webui-ostaf", f"`<ostaf:{name}:λ>` (loads the tokens)", token),
        ("A1111 built-in Lora, bundle", f"`<lora:{name}.a1111:λ>` (`implant --bundle`)", token),
        ("A1111 / Forge / SD.Next embeddings folder", f"{file} in `embeddings/`", stem),
        ("ComfyUI", f"{file} in `models/embeddings/`", f"embedding:{stem}"),
        ("diffusers", f'`load_textual_inversion(…, token="{token}")`', token),
    ]


def trigger_notes(tokens: Sequence[str], name: str) -> str:
    """One line per token for an A1111 card's notes: the prompt word in each tool."""
    lines = []
    for token in tokens:
        forms = "; ".join(
            f"{tool}: " + (f'token="{word}"' if tool == "diffusers" else word)
            for tool, _, word in trigger_forms(token, name)
        )
        lines.append(f"Trigger {token} — {forms}.")
    return "\n".join(lines)


def error_html(error: object, *, interrupted: bool = False) -> str:
    kind = "ostaf-interrupted" if interrupted else "ostaf-error"
    title = "Interrupted" if interrupted else "Error"
    note = " Nothing was written." if interrupted else ""
    return f"<div class='{kind}'><b>{title}:</b> {html.escape(str(error))}{note}</div>"


def result_html(result: dict[str, Any]) -> str:
    """The result card after a successful training run."""
    name = str(result.get("name", ""))
    rows = [
        ("File", result.get("path", "")),
        ("Size", f"{int(result.get('size', 0)) / 1024:.1f} KiB"),
        ("Hash", result.get("hash", "")),
        ("Layers", result.get("layers", "")),
        ("Steps", result.get("steps", "")),
        (
            "Probe loss",
            f"{float(result.get('loss_before', 0)):.4f} → {float(result.get('loss_after', 0)):.4f}",
        ),
        ("Time", f"{float(result.get('seconds', 0)):.1f} s"),
        ("Use", format_tag(name, 1.0)),
    ]
    lam = ", ".join(f"{x:g}" for x in result.get("sweep_lambdas", []))
    if lam:
        rows.append(("Sweep λ", lam))
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return (
        f"<div class='ostaf-result'><h3>{html.escape(name)}</h3>"
        f"<table class='ostaf-result-table'>{body}</table></div>"
    )


_BUTTON = re.compile(r"<button\b([^>]*)>(.*?)</button>", re.S)


def without_folder_buttons(dirs_html: str, folder_suffix: str) -> str:
    """A1111's folder-filter buttons (``ExtraNetworksPage.create_dirs_view_html``) less the
    folders whose name ends with ``folder_suffix`` (object adapters' ``<name>.embeddings/``
    hold token embeddings, not adapters). Only the "all" button left → no buttons, as A1111
    shows for a folder without subfolders."""
    kept, dropped = [], 0
    for m in _BUTTON.finditer(dirs_html):
        label = html.unescape(m.group(2)).strip()
        parts = [p for p in re.split(r"[/\\]", label) if p]
        if any(p.endswith(folder_suffix) for p in parts):
            dropped += 1
        else:
            kept.append(m)
    if not dropped:
        return dirs_html
    if all("search-all" in m.group(1) for m in kept):
        return ""
    return "".join(m.group(0) for m in kept)
