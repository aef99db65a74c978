"""Generation parameters in PNG files, in the form the SD v1 world reads: AUTOMATIC1111's "parameters" text chunk.

    a red circle on the left
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, CFG scale: 5, Seed: 42, Size: 64x64, Model hash: 3f1c0b9a2d, Model: tiny

The first lines are the prompt, then an optional "Negative prompt:" line, then one line of ``key: value`` pairs
separated by commas (values with a comma or colon are quoted). Web UIs, image browsers and civitai read it.
sdkit writes it beside its own "sdkit" chunk (JSON, every option exactly, for re-running) and reads both back.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

PARAMETERS_KEY = "parameters"   # A1111's chunk
SDKIT_KEY = "sdkit"             # sdkit's JSON record

# sdkit sampler -> the name A1111 shows (karras grids add " Karras", as A1111 1.5 and earlier wrote it)
A1111_SAMPLERS = {"ddpm": "DDPM", "ddim": "DDIM", "plms": "PLMS", "dpm_solver": "DPM-Solver", "dpm_solver++":
                  "DPM-Solver++", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "lms": "LMS",
                  "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "unipc": "UniPC"}


def file_hash(path: str | os.PathLike) -> str:
    """A1111's model hash: the first 10 hex digits of the file's SHA-256 (folders: of their sorted file hashes)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:10]


def model_identity(model) -> dict:
    """The model's name and hash for the parameters line (cached on the model: hashing a 4 GB file takes
    seconds). Random-weight models have no hash."""
    cached = getattr(model, "_sdkit_identity", None)
    if cached is None:
        path = getattr(model, "checkpoint_path", None)
        name = Path(path).stem if path else getattr(model, "config_name", None)
        cached = {"model": name, "model_hash": file_hash(path) if path and os.path.exists(path) else None}
        object.__setattr__(model, "_sdkit_identity", cached)
    return cached


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def a1111_text(p: dict) -> str:
    """The "parameters" text of one image's record ``p`` (prompt, negative_prompt, steps, sampler, karras,
    guidance_scale, seed, width, height, model, model_hash, and optional strength, eta)."""
    lines = [p.get("prompt") or ""]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    sampler = A1111_SAMPLERS.get(p["sampler"], p["sampler"]) + (" Karras" if p.get("karras") else "")
    fields = {"Steps": p["steps"], "Sampler": sampler, "CFG scale": f"{p['guidance_scale']:g}", "Seed": p["seed"],
              "Size": f"{p['width']}x{p['height']}", "Model hash": p.get("model_hash"), "Model": p.get("model"),
              "Denoising strength": p.get("strength"), "Eta": p.get("eta") or None, "Version": "sdkit"}
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict:
    """Read A1111 "parameters" text back: {"prompt", "negative_prompt", and every ``key: value`` field}."""
    lines = text.strip().split("\n")
    fields: dict[str, Any] = {}
    if lines and _FIELD.match(lines[-1]) and "Steps:" in lines[-1]:
        for key, value in _FIELD.findall(lines.pop()):
            fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    negative = [i for i, line in enumerate(lines) if line.startswith("Negative prompt:")]
    prompt_lines = lines[:negative[0]] if negative else lines
    return {"prompt": "\n".join(prompt_lines),
            "negative_prompt": "\n".join(lines[negative[0]:])[len("Negative prompt:"):].strip() if negative else "",
            **fields}


def png_text(record: dict) -> dict[str, str]:
    """Both text chunks for one image's record."""
    return {PARAMETERS_KEY: a1111_text(record), SDKIT_KEY: json.dumps(record, ensure_ascii=False)}


def read_parameters(path: str | os.PathLike) -> dict:
    """The generation parameters of a PNG written by sdkit (its JSON record) or by any A1111-style tool
    (the parsed "parameters" text); {} when the file has neither."""
    from PIL import Image

    with Image.open(path) as image:
        info = dict(image.info)
    if SDKIT_KEY in info:
        return json.loads(info[SDKIT_KEY])
    if PARAMETERS_KEY in info:
        return parse_a1111(info[PARAMETERS_KEY])
    return {}
