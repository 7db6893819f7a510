#!/usr/bin/env bash
# On a lent device, the last call of a kit `make device-kit` packed: joins the GGUF parts carried over (those of
# earlier calls already copied into $KIT, kept while the machine stays warm), refuses a file whose SHA-256 differs,
# and installs the carried wheels into $KIT/site. Once joined, a later call finds the file and does nothing.
# The benchmarks then run with PYTHONPATH=src:$KIT/site on $KIT/smollm2.gguf (gpu_convert.sh, gpu_encode.py).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
device=${DEVICE_KIT:-$root/.device}
kit=${KIT:-/tmp/kit}
mkdir -p "$kit"
if [ -f "$kit/smollm2.gguf" ]; then exit 0; fi
cp "$device"/gguf.part.* "$kit"/
cat "$kit"/gguf.part.* > "$kit/smollm2.gguf.joining"
if [ "$(sha256sum "$kit/smollm2.gguf.joining" | cut -d' ' -f1)" != "$(cat "$device/gguf.sha256")" ]; then
  echo "unpack_kit: the joined GGUF does not match gguf.sha256 (a part missing?): $(ls "$kit")" >&2
  exit 1
fi
mv "$kit/smollm2.gguf.joining" "$kit/smollm2.gguf"
if compgen -G "$device/wheels/*.whl" > /dev/null; then
  pip install -q --no-index --no-deps --target "$kit/site" "$device"/wheels/*.whl
fi
