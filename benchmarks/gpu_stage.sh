#!/usr/bin/env bash
# Assemble a model staged in parts on the lent GPU (see shared/GPU.md and benchmarks/stage_model.sh).
# Each `run` call carries some of .stage/NAME/partNN; this copies them to /root/stash/NAME/, and once the
# concatenation matches .stage/NAME/sha256 writes /root/stash/NAME.gguf and exits 0; otherwise it lists
# what is there and exits 3. Also installs the carried gguf wheel into /tmp/site (PYTHONPATH=/tmp/site).
#   run(carry=[".stage/gemma/part00", ".stage/gemma/sha256", ".whl"], command="bash benchmarks/gpu_stage.sh gemma")
#   ... one call per part, back to back (the stash lives only while the machine is warm), then
#   run(carry=[...], command="bash benchmarks/gpu_stage.sh gemma && python benchmarks/...")
set -uo pipefail
name=$1
dst=/root/stash/$name
want=$(cat ".stage/$name/sha256")
have() { [ -f "$dst.gguf" ] && [ "$(sha256sum "$dst.gguf" | cut -c1-64)" = "$want" ]; }
if ! have; then
  mkdir -p "$dst"
  cp .stage/"$name"/part* "$dst"/ 2>/dev/null
  cat "$dst"/part* > "$dst.gguf"
fi
if [ -f .whl/gguf-0.19.0-py3-none-any.whl ] && [ ! -d /tmp/site/gguf ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/gguf-0.19.0-py3-none-any.whl
fi
if have; then echo "$name ready: $dst.gguf"; exit 0; fi
echo "$name staged so far: $(ls "$dst" | tr '\n' ' ')"
exit 3
