#!/usr/bin/env bash
# Download (here, where pip reaches its index) the pure-Python wheels that tools/gpu_check.sh needs and the lent
# GPU machine lacks (see /work/.library/device/KINDS.md: it has torch, transformers, lightning, safetensors,
# huggingface-hub, requests, numpy, pillow, regex, filelock, pyyaml, zipp ... but no diffusers, omegaconf, ftfy,
# wcwidth), for Python 3.12 x86-64, into .whl/ (ignored by git through .git/info/exclude).
# Versions are those of requirements/constraints.txt. Then it checks what the run would carry (64 MiB at most).
#
#   bash tools/gpu_wheels.sh
#
# antlr4-python3-runtime: omegaconf 2.4 vendors it (omegaconf/vendor/antlr4), so no wheel is needed. An older
# omegaconf (2.3) needs antlr4-python3-runtime==4.9.*, which exists only as an sdist: build its wheel here with
#   python -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}; [ -x "$PY" ] || PY=python3
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

pin() {  # NAME -> NAME==VERSION from requirements/constraints.txt (else the name alone)
    local line; line=$(grep -i "^$1==" requirements/constraints.txt | head -1 || true)
    echo "${line:-$1}"
}
WANT="diffusers omegaconf ftfy wcwidth"
# diffusers lists importlib_metadata but imports it only on Python < 3.8 (diffusers/utils/import_utils.py): not
# carried (its own wheel would need lazy-importer, which the device lacks too).
mkdir -p .whl
rm -f .whl/*.whl
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
# shellcheck disable=SC2046,SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
    -d .whl $(for n in $WANT; do pin "$n"; done) 2>&1 | grep -v "is ignored: it is neither" || true
ls -la .whl

echo "== what the wheels require (Requires-Dist, extras left out); the device must have each:"
for w in .whl/*.whl; do
    echo "-- $(basename "$w")"
    "$PY" - "$w" <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
for line in z.read(meta).decode().splitlines():
    if line.startswith("Requires-Dist:") and "extra ==" not in line:
        print("   ", line.split(":", 1)[1].strip())
PY
done
echo "   (device has, per KINDS.md: huggingface-hub 1.33 (diffusers wants >=1.32,<3), safetensors 0.8.0 (>=0.8.0),"
echo "    numpy, pillow, regex, requests, filelock, pyyaml; wcwidth travels here; importlib_metadata is imported"
echo "    by diffusers only on Python < 3.8)"

echo "== what a device run would carry (tracked files present + untracked-not-ignored + .whl); limit 64 MiB:"
"$PY" - <<'PY'
import os, subprocess
def files(*args):
    out = subprocess.run(["git", "ls-files", "-z", *args], capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and os.path.isfile(f)]
tracked, untracked = files(), files("--others", "--exclude-standard")
whl = [os.path.join(".whl", f) for f in os.listdir(".whl")]
size = lambda fs: sum(os.path.getsize(f) for f in fs)
total = size(tracked) + size(untracked) + size(whl)
print(f"  tracked {size(tracked) / 2**20:.1f} MiB + untracked {size(untracked) / 2**20:.1f} MiB "
      f"+ .whl {size(whl) / 2**20:.1f} MiB = {total / 2**20:.1f} MiB")
if total > 64 * 2**20:
    big = sorted(tracked + untracked, key=os.path.getsize, reverse=True)[:6]
    print("  OVER 64 MiB. The GPU check needs none of the shipped weights (it builds random-weight models).")
    print("  Largest paths:", ", ".join(f"{f} ({os.path.getsize(f) / 2**20:.1f} MiB)" for f in big))
    print("  Keep data/*.safetensors out of the run: move them aside for the one call and back after it, e.g.")
    print("    mkdir -p /tmp/sdkit-hold && mv data/*.safetensors /tmp/sdkit-hold/   # before the run call")
    print("    mv /tmp/sdkit-hold/*.safetensors data/                               # right after it")
else:
    print("  fits")
PY
