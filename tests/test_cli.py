"""The fp4kit command line."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from fp4kit import __version__
from fp4kit.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "fp4kit", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"fp4kit {__version__}"


def test_formats_prints_e2m1_table(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    assert "   7  0111  +6" in out and "  15  1111  -6" in out and "   8  1000  -0" in out


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_formats_roundtrip_safetensors(tmp_path, capsys, scheme):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(8, 64), "odd": torch.randn(3, 20), "ids": torch.arange(4)}, str(path))
    assert main(["formats", "--roundtrip", str(path), "--scheme", scheme]) == 0
    out = capsys.readouterr().out
    assert "w " in out and "odd" in out and "not divisible" in out and "not floating point" in out


def test_formats_roundtrip_pt_uses_weights_only(tmp_path, capsys):
    path = tmp_path / "t.pt"
    torch.save({"w": torch.randn(4, 32)}, path)
    assert main(["formats", "--roundtrip", str(path)]) == 0


def test_formats_roundtrip_refuses_pickled_objects(tmp_path, capsys):
    import datetime

    path = tmp_path / "evil.pt"
    torch.save({"w": datetime.datetime(2026, 1, 1)}, path)  # any non-tensor global needs full unpickling
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        main(["formats", "--roundtrip", str(path)])


def test_formats_roundtrip_nan_names_tensor(tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    t = torch.randn(2, 32)
    t[0, 0] = float("nan")
    save_file({"layer.weight": t}, str(path))
    assert main(["formats", "--roundtrip", str(path)]) == 2
    assert "layer.weight: 1 NaN" in capsys.readouterr().err


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["formats", "--roundtrip", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
