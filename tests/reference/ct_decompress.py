"""Decompress an exported checkpoint folder with compressed-tensors' own compressors.

    python ct_decompress.py FOLDER OUT.safetensors

Parses config.json's quantization_config with compressed-tensors' QuantizationConfig (so a field it
does not know fails here), then decompresses every layer that has weight_packed and writes the
dense weights it gets (bf16, as compressed-tensors returns them).
"""

import json
import pathlib
import sys

import torch
from compressed_tensors.compressors import MXFP4PackedCompressor, NVFP4PackedCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file, save_file

folder, dst = pathlib.Path(sys.argv[1]), sys.argv[2]
qc = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
scheme = qc.config_groups["group_0"]
compressor = {"nvfp4-pack-quantized": NVFP4PackedCompressor, "mxfp4-pack-quantized": MXFP4PackedCompressor}[qc.format]
tensors = {}
for f in sorted(folder.glob("*.safetensors")):
    tensors.update(load_file(str(f)))
out = {}
for name in sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")}):
    layer = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
    out[name] = compressor.decompress(layer, scheme)["weight"].to(torch.bfloat16).contiguous()
save_file(out, dst)
