"""lib_ostaf never imports the WebUI's ``modules`` at import time; install.py plans right."""

from __future__ import annotations

import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import lib_ostaf

ROOT = Path(__file__).resolve().parents[1]


def test_every_lib_ostaf_module_imports_without_modules():
    found = pkgutil.walk_packages(lib_ostaf.__path__, "lib_ostaf.")
    names = [m.name for m in found if not m.name.endswith("__main__")]
    assert "lib_ostaf.hosts.a1111" in names and "lib_ostaf.webui.api" in names
    code = (
        "import importlib, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'modules' or name.startswith('modules.') or name in ('networks',"
        " 'network', 'gradio', 'launch'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for n in {names!r}:\n"
        "    importlib.import_module(n)\n"
        "assert 'modules' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def _install_module():
    spec = importlib.util.spec_from_file_location("ostaf_install", ROOT / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_install_plans_only_missing_unpinned(tmp_path):
    inst = _install_module()
    (tmp_path / "requirements_versions.txt").write_text("torch\nsafetensors==0.4.2  # pin\n")
    assert inst.plan(tmp_path, lambda name: True) == ([], [])  # all present: nothing
    specs, notes = inst.plan(tmp_path, lambda name: False)
    assert specs == ["numpy", "Pillow"]  # safetensors/torch are the WebUI's to install
    assert len(notes) == 2 and "safetensors==0.4.2" in " ".join(notes)
    specs, _ = inst.plan(tmp_path / "no_webui", lambda name: name != "safetensors")
    assert specs == ["safetensors>=0.4"]


def test_preload_adds_the_flag():
    import argparse

    spec = importlib.util.spec_from_file_location("ostaf_preload", ROOT / "preload.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    parser = argparse.ArgumentParser()
    mod.preload(parser)
    assert parser.parse_args(["--ostaf-dir", "/x"]).ostaf_dir == "/x"
    assert parser.parse_args([]).ostaf_dir is None
