#!/usr/bin/env bash
# Split a model file over 64 MiB into parts under .stage/NAME/ (ignored by git) for the lent GPU,
# where each `run` call carries one part and copies it to /root/stash; a last call reassembles the
# file there and checks its SHA-256 (see shared/GPU.md). Usage: benchmarks/stage_model.sh FILE NAME
set -euo pipefail
file=$1 name=$2
mkdir -p ".stage/$name"
split -b 50m -d "$file" ".stage/$name/part"
sha256sum "$file" | cut -c1-64 > ".stage/$name/sha256"
echo "parts: $(ls .stage/$name/part* | wc -l)  sha256: $(cat .stage/$name/sha256)"
echo "per part:   run(carry=['.stage/$name/partNN'], command='mkdir -p /root/stash/$name && cp .stage/$name/partNN /root/stash/$name/')"
echo "assemble:   cat /root/stash/$name/part* > /root/stash/$name.gguf && sha256sum /root/stash/$name.gguf"
