"""Heads you can publish (core/residual/model_card.py): the run-named head file, older names still found,
and the model card written beside the head with the same fields in its metadata."""

import json

import pytest
from safetensors import safe_open

from qwen_identity.core.identity.features import FeatureSettings
from qwen_identity.core.residual.head import HeadMeta, ResidualHead, load_head, save_head
from qwen_identity.core.residual.model_card import (LICENCE_TO_FILL, card_fields, card_path, find_head, head_file_name,
                                                     head_path, save_head_with_card)


def _head(**meta):
    m = HeadMeta(feature_dim=8, tokens=2, hidden_size=3584, feature_settings=FeatureSettings().to_meta(),
                 qwen3_vl_model="Qwen/Qwen3-VL-2B-Instruct", text_encoder_model="Qwen-Image/text_encoder",
                 target="denoise", dataset_fingerprint="abc123", **meta)
    return ResidualHead(8, 2, 3584, meta=m)


def test_head_file_is_named_after_the_run_and_old_names_are_found(tmp_path):
    assert head_file_name("v1") == "v1_head.safetensors"
    assert head_file_name("my run/../x") == "my_run_.._x_head.safetensors"
    out = tmp_path / "runs" / "v1"
    assert head_path(out) == out / "checkpoints" / "v1_head.safetensors"
    assert find_head(out) is None
    old = out / "checkpoints" / "linear_head.safetensors"
    save_head(_head(), old)
    assert find_head(out) == old                 # a run of an older version
    save_head_with_card(_head(), head_path(out))
    assert find_head(out) == head_path(out)      # the run-named head wins


def test_card_fields_are_in_the_markdown_and_in_the_metadata(tmp_path):
    gain = {"identity_gain": 0.0123, "identity_gain_ci95": [0.004, 0.02], "own_gain": 0.015, "impostor_gain": 0.0027,
            "identity_gain_relative": 0.01, "persons": 5, "photos": 20}
    head = _head(metrics={"held_out_gain": gain, "train_identities": 40, "val_identities": 5, "step": 300,
                          "epochs": 3})
    path = save_head_with_card(head, tmp_path / "checkpoints" / "v1_head.safetensors")
    card = card_path(path).read_text()
    assert card_path(path).name == "v1_head.md"
    for text in ("qwen-image", "Qwen/Qwen3-VL-2B-Instruct", "denoise", "| photo crop of the features | face |",
                 "| identity tokens K | 2 |", "abc123", "| people in the data | 45 |", "0.0123", "0.004 .. 0.02",
                 "impostor gain 0.0027", "| training steps | 300 |", LICENCE_TO_FILL, "## Intended use", "## Misuse",
                 "consent"):
        assert text in card, text
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["qwen_identity"])
    assert meta["card"] == card_fields(load_head(path))
    fields = load_head(path).meta.card
    assert fields["crop"] == "face" and fields["tokens_K"] == 2 and fields["persons"] == 45
    assert fields["held_out_gain"]["impostor_gain"] == 0.0027 and fields["training_steps"] == 300


def test_card_of_a_head_without_a_measured_gain_says_how_to_measure_it(tmp_path):
    head = _head()
    head.meta.target = "caption"
    head.meta.feature_settings = {"source": "merger_pooled", "resolution": "center_crop_448"}  # before the crop
    path = save_head_with_card(head, tmp_path / "h_head.safetensors", persons=7)
    card = card_path(path).read_text()
    assert "| held-out gain | not measured" in card and "eval --denoise-gain" in card
    assert "| photo crop of the features | center |" in card and "| people in the data | 7 |" in card


def test_a_filled_in_licence_survives_the_next_save(tmp_path):
    head = _head()
    path = save_head_with_card(head, tmp_path / "h_head.safetensors", licence="CC-BY-4.0")
    again = load_head(path)
    save_head_with_card(again, path)
    assert "| licence | CC-BY-4.0 |" in card_path(path).read_text()


def test_heads_without_a_card_still_load(tmp_path):
    path = save_head(_head(), tmp_path / "old.safetensors")
    head = load_head(path)
    assert head.meta.card == {} and head.proj.weight.shape == (2 * 3584, 8)


@pytest.mark.parametrize("objective", ["caption"])
def test_training_writes_the_run_named_head_and_its_card(objective, tiny_models, make_dataset, tmp_path, capsys):
    from qwen_identity.cli import main

    dirs = make_dataset(identities=3, views=2, size=(64, 64))
    out = tmp_path / "my_run"
    code = main(["train", "--seed-dirs", ",".join(map(str, dirs)), "--qwen3-vl-model", str(tiny_models.qwen3vl),
                 "--qwen-image-model", str(tiny_models.qwen_image), "--epochs", "1", "--objective", objective,
                 "--device", "cpu", "--crop", "center", "--out-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["my_run_head.md", "my_run_head.safetensors",
                                                                      "train_state.safetensors"]
    card = (out / "checkpoints" / "my_run_head.md").read_text()
    assert "| objective | caption |" in card and "| people in the data | 3 |" in card
    assert "| photo crop of the features | center |" in card
    assert "my_run_head.safetensors" in capsys.readouterr().out
