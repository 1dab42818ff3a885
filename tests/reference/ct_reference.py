"""Run compressed-tensors' own NVFP4/MXFP4 compression on tensors from a file, write what it stores.

Used by tests/formats/test_vs_compressed_tensors.py in a subprocess, so that several versions of
compressed-tensors (the newest installed, and 0.17.0 under .deps/ct-0.17.0) can each be checked:

    python ct_reference.py IN.safetensors OUT.safetensors

For every float32 2-D tensor NAME in IN it writes NAME.nvfp4.{weight_packed,weight_scale,
weight_global_scale,weight}, NAME.mxfp4.{weight_packed,weight_scale,weight} (weight = what
compressed-tensors decompresses back) and the version string as a tensor of bytes.
"""

import sys

import compressed_tensors
import torch
from compressed_tensors.compressors import MXFP4PackedCompressor, NVFP4PackedCompressor
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
from safetensors.torch import load_file, save_file


def observe(x, group):
    """What llm-compressor's min-max observer hands to calculate_qparams: per-group min and max."""
    g = x.reshape(x.shape[0], -1, group)
    return g.amin(-1), g.amax(-1)


def main(src, dst):
    out = {}
    for name, x in load_file(src).items():
        nv = preset_name_to_scheme("NVFP4A16", ["Linear"])
        gs = generate_gparam(x.min(), x.max())
        mins, maxs = observe(x, 16)
        scale, _ = calculate_qparams(mins, maxs, nv.weights, global_scale=gs)
        c = NVFP4PackedCompressor.compress({"weight": x, "weight_scale": scale, "weight_global_scale": gs}, nv)
        for k in ("weight_packed", "weight_scale", "weight_global_scale"):
            out[f"{name}.nvfp4.{k}"] = c[k].contiguous()
        d = NVFP4PackedCompressor.decompress(dict(c), nv)
        out[f"{name}.nvfp4.weight"] = d["weight"].float().contiguous()

        mx = preset_name_to_scheme("MXFP4A16", ["Linear"])
        mins, maxs = observe(x, 32)
        scale, _ = calculate_qparams(mins, maxs, mx.weights)
        c = MXFP4PackedCompressor.compress({"weight": x, "weight_scale": scale}, mx)
        for k in ("weight_packed", "weight_scale"):
            out[f"{name}.mxfp4.{k}"] = c[k].contiguous()
        d = MXFP4PackedCompressor.decompress(dict(c), mx)
        out[f"{name}.mxfp4.weight"] = d["weight"].float().contiguous()
    out["__version__"] = torch.tensor(list(compressed_tensors.__version__.encode()), dtype=torch.uint8)
    save_file(out, dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
