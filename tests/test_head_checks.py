"""Head compatibility checks (features and conditioning) and the LoadResidualHead node."""

import pytest
import torch

from qwen_identity.core.errors import ModelMismatchError, UserInputError
from qwen_identity.core.residual.head import (HeadMeta, ResidualHead, check_head_features, check_head_hidden, head_summary,
                                     load_head, save_head)


def _head(d=64, k=2, h=32, **meta):
    settings = {"source": "merger_pooled", "layer": None, "resolution": "center_crop_448", "max_pixels": 200704}
    m = HeadMeta(feature_dim=d, tokens=k, hidden_size=h, feature_settings=settings, qwen3_vl_model="tiny-qwen3-vl",
                 text_encoder_model="tiny-qwen-image/text_encoder", **meta)
    return ResidualHead(d, k, h, meta=m)


def _features_meta(**over):
    meta = {"model_id": "tiny-qwen3-vl", "feature_dim": 64, "source": "merger_pooled", "layer": None,
            "resolution": "center_crop_448", "max_pixels": 200704, "n_images": 2}
    meta.update(over)
    return meta


def test_matching_features_pass_without_warnings():
    assert check_head_features(_head(), _features_meta()) == []


def test_feature_width_mismatch_names_both_sides():
    with pytest.raises(ModelMismatchError) as e:
        check_head_features(_head(d=2048), _features_meta(feature_dim=4096))
    msg = str(e.value)
    assert "D=4096" in msg and "Qwen3-VL-8B" in msg and "D=2048" in msg and "Qwen3-VL-2B" in msg


def test_feature_source_or_layer_mismatch_is_an_error():
    with pytest.raises(ModelMismatchError, match="source='llm_hidden'.*source='merger_pooled'"):
        check_head_features(_head(), _features_meta(source="llm_hidden", layer=-1))
    head = _head()
    head.meta.feature_settings.update(source="llm_hidden", layer=-1)
    with pytest.raises(ModelMismatchError, match="layer=-2.*layer=-1"):
        check_head_features(head, _features_meta(source="llm_hidden", layer=-2))


def test_resolution_policy_mismatch_is_only_a_warning():
    warnings = check_head_features(_head(), _features_meta(resolution="pixel_budget", max_pixels=500000, crop="center"))
    assert len(warnings) == 2 and "resolution='pixel_budget'" in warnings[0] and "center_crop_448" in warnings[0]
    # recorded before the crop setting, pixel_budget features saw the whole photo: another crop, warned about too
    warnings = check_head_features(_head(), _features_meta(resolution="pixel_budget", max_pixels=500000))
    assert len(warnings) == 3 and "crop 'full'" in warnings[0] and "trained on crop 'center'" in warnings[0]


def test_features_object_with_meta_attribute_is_accepted():
    class Feats:
        combined = torch.zeros(64)
        meta = _features_meta(model_id="other-finetune")

    warnings = check_head_features(_head(), Feats())
    assert len(warnings) == 1 and "other-finetune" in warnings[0]


def test_hidden_size_mismatch_names_both_generations():
    check_head_hidden(_head(h=3584), 3584)
    with pytest.raises(ModelMismatchError) as e:
        check_head_hidden(_head(h=3584), 4096)
    msg = str(e.value)
    assert "H=4096" in msg and "Qwen-Image 2.1" in msg and "H=3584" in msg and "Qwen2.5-VL-7B" in msg


def test_summary_mentions_sizes_and_prompt():
    head = _head(base_prompt="a portrait", target="caption", metrics={"train_loss": 0.5, "epochs": 3})
    s = head_summary(head)
    assert "D=64" in s and "K=2" in s and "H=32" in s and "a portrait" in s and "train_loss=0.5" in s


# --- the node ----------------------------------------------------------------------------------
@pytest.fixture
def heads_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_IDENTITY_MODELS_DIR", str(tmp_path / "models"))
    folder = tmp_path / "models" / "identity_heads"
    folder.mkdir(parents=True)
    return folder


def test_node_lists_loads_and_summarises(heads_folder, tmp_path):
    from qwen_identity.nodes.head_nodes import LoadResidualHead

    head = _head(base_prompt="a portrait")
    with torch.no_grad():
        head.proj.weight.normal_()
    save_head(head, heads_folder / "sub" / "person.safetensors")
    spec = LoadResidualHead.INPUT_TYPES()
    assert spec["required"]["head_name"][0] == ["sub/person.safetensors"]
    for section in spec.values():
        for name, (_, opts) in section.items():
            assert opts.get("tooltip"), name
    loaded, summary = LoadResidualHead().load("sub/person.safetensors")
    f = torch.randn(1, 64)
    assert torch.equal(loaded(f), head(f)) and "a portrait" in summary
    # the path input wins when not empty
    other = _head(d=8, k=1, h=4)
    save_head(other, tmp_path / "elsewhere.safetensors")
    loaded, _ = LoadResidualHead().load("sub/person.safetensors", head_path=str(tmp_path / "elsewhere.safetensors"))
    assert loaded.feature_dim == 8


def test_node_refuses_names_outside_the_folder(heads_folder, tmp_path):
    from qwen_identity.nodes.head_nodes import LoadResidualHead

    save_head(_head(), tmp_path / "models" / "outside.safetensors")
    with pytest.raises(UserInputError, match="outside"):
        LoadResidualHead().load("../outside.safetensors")
    with pytest.raises(UserInputError, match="not found"):
        LoadResidualHead().load("missing.safetensors")
    with pytest.raises(UserInputError, match="no head selected"):
        LoadResidualHead().load("(no heads in models/identity_heads)")


def test_node_reports_damaged_files(heads_folder):
    from qwen_identity.nodes.head_nodes import LoadResidualHead

    (heads_folder / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserInputError, match="bad.safetensors"):
        LoadResidualHead().load("bad.safetensors")
    assert LoadResidualHead.IS_CHANGED("bad.safetensors") != LoadResidualHead.IS_CHANGED("missing.safetensors")


def test_equal_heads_save_to_identical_bytes(tmp_path):
    """safetensors orders its metadata map differently from call to call; save_head must not."""
    head = _head(base_prompt="x", metrics={"a": 1, "b": 2})
    blobs = {save_head(head, tmp_path / f"{i}.safetensors").read_bytes() for i in range(6)}
    assert len(blobs) == 1
    assert load_head(tmp_path / "0.safetensors").meta.metrics == {"a": 1, "b": 2}
