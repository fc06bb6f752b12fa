"""P4: in a running WebUI, ``<ostaf:x:λ>`` vs ``<lora:x:λ>`` of the same file — generation
time ratio and whether the images are identical.

The adapter must be in the OSTAF folder (name ``x``) and, as a copy, in the WebUI's Lora
folder (``--lora-dir`` copies it there and refreshes). Requests alternate (ostaf, lora,
none), so a change of tags re-merges every time for both, and drift hits all three alike.

    python bench/webui_p4.py --url http://127.0.0.1:7860 --adapter x \\
        --lora-dir /path/to/webui/models/Lora [--rounds 8] [--steps 20] [--size 256]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import statistics
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image


def call(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def generate(url: str, prompt: str, steps: int, size: int) -> tuple[np.ndarray, float]:
    body = {"prompt": prompt, "steps": steps, "width": size, "height": size, "seed": 7,
            "sampler_name": "Euler", "cfg_scale": 5}  # fmt: skip
    t0 = time.perf_counter()
    r = call(url, "/sdapi/v1/txt2img", body)
    seconds = time.perf_counter() - t0
    image = Image.open(io.BytesIO(base64.b64decode(r["images"][0]))).convert("RGB")
    return np.asarray(image), seconds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--lambda", dest="lam", type=float, default=1.0)
    ap.add_argument("--lora-dir", type=Path)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args(argv)
    url = args.url.rstrip("/")
    if args.lora_dir:
        src = Path(call(url, f"/ostaf/v1/adapter?name={args.adapter}")["path"])
        shutil.copy(src, args.lora_dir / f"{args.adapter}.safetensors")
        call(url, "/sdapi/v1/refresh-loras", {})
    prompts = {
        "ostaf": f"a photo of a cat <ostaf:{args.adapter}:{args.lam}>",
        "lora": f"a photo of a cat <lora:{args.adapter}:{args.lam}>",
        "none": "a photo of a cat",
    }
    for p in prompts.values():  # warm-up (first loads, caches)
        generate(url, p, args.steps, args.size)
    times: dict[str, list[float]] = {k: [] for k in prompts}
    images: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for key, prompt in prompts.items():
            image, seconds = generate(url, prompt, args.steps, args.size)
            times[key].append(seconds)
            if key in images and not np.array_equal(images[key], image):
                print(f"warning: {key} is not reproducible between rounds")
            images[key] = image
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = np.abs(images["ostaf"].astype(int) - images["lora"].astype(int))
    result = {
        "median_s": med,
        "ostaf_over_lora": med["ostaf"] / med["lora"],
        "ostaf_over_none": med["ostaf"] / med["none"],
        "identical": bool(not diff.any()),
        "max_abs_diff": int(diff.max()),
        "adapter_changes_image": bool(np.abs(images["ostaf"].astype(int) - images["none"]).any()),
        "rounds": args.rounds,
        "steps": args.steps,
        "size": args.size,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
