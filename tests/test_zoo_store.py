"""Checkpoints of the embedded models (guidekit.zoo.store): a failed save leaves the earlier checkpoint."""

from __future__ import annotations

import pytest
import torch

from guidekit.zoo.store import read_record, read_weights, write_checkpoint


def test_a_failed_save_leaves_the_earlier_checkpoint_and_no_partial_files(tmp_path) -> None:
    first = torch.nn.Linear(2, 2)
    write_checkpoint(first, "net", {"run": 1}, tmp_path)
    second = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError):  # the record cannot be written: nothing is replaced
        write_checkpoint(second, "net", {"run": 2, "bad": object()}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.json", "net.safetensors"]
    assert read_record("net", tmp_path) == {"run": 1}
    loaded = read_weights(torch.nn.Linear(2, 2), "net", tmp_path)
    assert torch.equal(loaded.weight, first.weight)
    write_checkpoint(second, "net", {"run": 2}, tmp_path)
    assert read_record("net", tmp_path) == {"run": 2}
    assert torch.equal(read_weights(torch.nn.Linear(2, 2), "net", tmp_path).weight, second.weight)


def test_a_missing_glyphs_checkpoint_names_its_training_command(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"python -m guidekit\.zoo\.glyphs\.train"):
        read_record("glyphs_denoiser", tmp_path)
