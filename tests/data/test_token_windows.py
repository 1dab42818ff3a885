"""fp4kit.data.token_windows: consecutive calibration windows, BOS-first for models that always see one, and
fp4kit quantize's calibration batches built with it."""

from types import SimpleNamespace

import pytest
import torch

from fp4kit.data import token_windows


def test_windows_are_consecutive_slices_without_bos():
    ids = torch.arange(100)
    w = token_windows(ids, 3, 10)
    assert [x.tolist() for x in w] == [[list(range(0, 10))], [list(range(10, 20))], [list(range(20, 30))]]


def test_bos_first_windows_cover_the_stream_without_overlap_and_first_skips():
    ids = torch.arange(10, 110)
    w = token_windows(ids, 2, 10, bos=1, first=3)
    # 9 stream tokens per window: windows 3 and 4 hold stream tokens 27..35 and 36..44
    assert w[0].tolist() == [[1, *range(37, 46)]] and w[1].tolist() == [[1, *range(46, 55)]]
    assert all(x.shape == (1, 10) for x in w)


def test_short_stream_and_bad_sizes_name_the_text():
    with pytest.raises(ValueError, match=r"my text: 50 tokens < 6 windows x 9 tokens"):
        token_windows(torch.arange(50), 6, 10, bos=0, what="my text")
    with pytest.raises(ValueError, match="my text: need"):
        token_windows(torch.arange(50), 1, 1, bos=0, what="my text")


class BosTokenizer:
    """ids = code points after a leading BOS (id 2), like Gemma-3's tokenizer."""

    bos_token_id = 2

    def __call__(self, text, return_tensors=None):
        return SimpleNamespace(input_ids=torch.tensor([[2] + [ord(c) for c in text]]))


def test_quantize_cli_calibration_windows_all_start_with_bos():
    """Before: only the first window began with BOS (the stream's own), the rest were mid-text slices."""
    from fp4kit.cli.quantize import _calibration_batches

    batches = _calibration_batches(BosTokenizer(), 4, 32)
    assert len(batches) == 4 and all(b.shape == (1, 32) and int(b[0, 0]) == 2 for b in batches)
    assert not any((b[0, 1:] == 2).any() for b in batches)
    assert torch.equal(batches[1][0, 1:], torch.cat([b[0, 1:] for b in batches])[31:62])
