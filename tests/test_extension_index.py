"""docs/extension-index.json is an entry the AUTOMATIC1111 extensions index would accept.

The checks restate the index's own validator (``.github/scripts/validate.py``,
``validate_entry``, in AUTOMATIC1111/stable-diffusion-webui-extensions at 956826ec,
2026-05-25) and its ``tags.json`` of that commit, so no network is needed.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

ENTRY = Path(__file__).resolve().parents[1] / "docs" / "extension-index.json"

# tags.json at 956826ec (keys only)
INDEX_TAGS = {
    "script",
    "localization",
    "tab",
    "dropdown",
    "ads",
    "installed",
    "training",
    "models",
    "UI related",
    "prompting",
    "editing",
    "manipulations",
    "online",
    "animation",
    "query",
    "science",
    "extras",
}
# validate.py's pattern for the entry's url
GIT_URL = re.compile(r"(https://[^ ]+?)(?:(?:\.git)$|$)")


def _entry() -> dict:
    return json.loads(ENTRY.read_text(encoding="utf-8"))


def test_entry_has_the_index_keys_and_a_git_url():
    entry = _entry()
    for key in ("name", "url", "description", "tags"):
        assert entry.get(key), key
    assert GIT_URL.match(entry["url"])
    if "added" in entry:  # optional; the index fills it in on merge
        datetime.date.fromisoformat(entry["added"])
    assert "\n" not in entry["description"] and len(entry["description"]) <= 400


def test_entry_uses_only_allowed_tags():
    tags = _entry()["tags"]
    assert set(tags) <= INDEX_TAGS
    assert set(tags) == {"training", "tab", "models"}
    # README rules: 'online' only if it contacts servers in normal use (it does not),
    # 'ads' for advertising, 'installed' is internal to the WebUI
    assert not {"online", "ads", "installed", "localization"} & set(tags)
    assert len(tags) == len(set(tags))


def test_a1111_folder_name_from_the_url():
    """A1111's Install from URL names the folder after the URL's last part with ".git"
    removed (modules/ui_extensions.py, get_extension_dirname_from_url): sd-webui-ostaf."""
    *_, last_part = _entry()["url"].split("/")
    assert last_part.replace(".git", "") == "sd-webui-ostaf"
