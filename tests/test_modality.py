"""Modality ids from model inputs: placeholders, processor type ids, padding, sample level."""

from types import SimpleNamespace

import pytest
import torch

from smar.modality import modality_ids, special_token_ids


def test_image_tokens_are_one_and_padding_is_ignored():
    ids = torch.tensor([[5, 9, 9, 6, 0], [9, 7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    got = modality_ids(ids, token_ids={1: 9}, attention_mask=mask)
    assert got.tolist() == [[0, 1, 1, 0, -1], [1, 0, 0, -1, -1]]


def test_mm_token_type_ids_win_over_input_ids():
    ids = torch.tensor([[9, 9, 5]])
    mm = torch.tensor([[0, 2, 1]])
    assert modality_ids(ids, token_ids={1: 9}, mm_token_type_ids=mm).tolist() == [[0, 2, 1]]


def test_several_modalities_and_token_lists():
    ids = torch.tensor([[1, 9, 8, 7, 3]])
    got = modality_ids(ids, token_ids={1: [9, 8], 2: 7})
    assert got.tolist() == [[0, 1, 1, 2, 0]]


def test_sample_level_marks_every_token_of_a_multimodal_sample():
    ids = torch.tensor([[5, 9, 6, 0], [5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    got = modality_ids(ids, token_ids={1: 9}, attention_mask=mask, level="sample")
    assert got.tolist() == [[1, 1, 1, -1], [0, 0, 0, 0]]


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        modality_ids(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="level"):
        modality_ids(torch.tensor([[1, 2]]), token_ids={1: 2}, level="word")
    with pytest.raises(ValueError, match="attention_mask"):
        modality_ids(
            torch.tensor([[1, 2]]), token_ids={1: 2}, attention_mask=torch.ones(1, 1, 2, 2)
        )


def test_special_token_ids_read_top_level_and_text_config():
    cfg = SimpleNamespace(
        image_token_index=32000,
        video_token_id=None,
        text_config=SimpleNamespace(image_token_id=32000, audio_token_id=7),
    )
    assert special_token_ids(cfg) == {1: [32000], 3: [7]}
    assert special_token_ids(None) == {}


def test_sample_level_with_several_modalities_takes_the_smallest_non_text_id():
    """docs/method.md#more-than-two-modalities: a sample with video and audio counts as video,
    one with an image and audio as image; a pure-text sample stays text."""
    ids = torch.tensor([[5, 7, 8, 4], [5, 8, 9, 5], [5, 6, 6, 5]])  # 9 image, 7 video, 8 audio
    got = modality_ids(ids, token_ids={1: 9, 2: 7, 3: 8}, level="sample")
    assert got.tolist() == [[2, 2, 2, 2], [1, 1, 1, 1], [0, 0, 0, 0]]
