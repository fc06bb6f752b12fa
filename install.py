# Run by the WebUI (a separate process, WebUI root on PYTHONPATH) on every launch.
# Installs only what is missing and never upgrades a package: inside a WebUI, OSTAF's core
# needs torch, safetensors, numpy and Pillow, which A1111 and Forge already provide; a
# package the host pins in requirements_versions.txt is left to the host to install.

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from pathlib import Path

# distribution name → pip spec used only when it is missing and the host does not pin it
NEEDED = {
    "torch": "torch",
    "safetensors": "safetensors>=0.4",
    "numpy": "numpy",
    "Pillow": "Pillow",
}


def host_pins(webui_root: Path) -> dict[str, str]:
    """``{normalised name: spec}`` of the host's requirements_versions.txt (empty if none)."""
    pins: dict[str, str] = {}
    path = webui_root / "requirements_versions.txt"
    if not path.is_file():
        return pins
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9_.\-]+)", line)
        if m:
            pins[_norm(m.group(1))] = line
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def plan(webui_root: Path, is_installed=installed) -> tuple[list[str], list[str]]:
    """(pip specs to install, notes). Never anything already installed or pinned by the host."""
    pins = host_pins(webui_root)
    to_install, notes = [], []
    for name, spec in NEEDED.items():
        if is_installed(name):
            continue
        if _norm(name) in pins:
            notes.append(
                f"{name} is missing but pinned by the WebUI ({pins[_norm(name)]}); "
                "the WebUI installs it"
            )
            continue
        to_install.append(spec)
    return to_install, notes


def main() -> int:
    try:
        import launch  # the WebUI's module: args, run_pip
    except ImportError:
        launch = None
    skip = bool(getattr(getattr(launch, "args", None), "skip_install", False))
    root = Path(os.environ.get("WEBUI_ROOT", "") or os.getcwd())
    specs, notes = plan(root)
    for note in notes:
        print(f"[OSTAF] {note}")
    if not specs:
        return 0
    if skip or launch is None:
        print(f"[OSTAF] missing packages not installed (--skip-install): {' '.join(specs)}")
        return 0
    for spec in specs:
        launch.run_pip(f'install "{spec}"', f"{spec} for OSTAF")
    return 0


if __name__ == "__main__":
    sys.exit(main())
