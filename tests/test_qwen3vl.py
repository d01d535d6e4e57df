"""Loading Qwen3-VL: the tiny checkpoint loads; wrong, incomplete or damaged folders give clear errors."""

import hashlib
import json
import shutil

import pytest
import torch

from qwen_identity.core.errors import UserInputError
from qwen_identity.core.identity.qwen3vl import check_model_type, load_qwen3vl


def tree_hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def vl_copy(tiny_qwen3vl_dir, tmp_path):
    dst = tmp_path / "Qwen3-VL-copy"
    shutil.copytree(tiny_qwen3vl_dir, dst)
    return dst


def test_loads_tiny_checkpoint_without_modifying_it(tiny_qwen3vl_dir):
    before = tree_hashes(tiny_qwen3vl_dir)
    bundle = load_qwen3vl(str(tiny_qwen3vl_dir), device="cpu", dtype="fp32")
    assert tree_hashes(tiny_qwen3vl_dir) == before
    assert type(bundle.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(bundle.processor).__name__ == "Qwen3VLProcessor"
    assert bundle.model_id == tiny_qwen3vl_dir.name
    assert bundle.feature_dim == bundle.model.config.text_config.hidden_size == 64
    assert bundle.device == torch.device("cpu") and bundle.dtype == torch.float32
    assert bundle.patch_multiple == 32
    assert not bundle.model.training
    assert all(not p.requires_grad for p in bundle.model.parameters())


def test_name_in_a_models_folder_and_bf16(tiny_qwen3vl_dir):
    bundle = load_qwen3vl(tiny_qwen3vl_dir.name, search_dirs=[tiny_qwen3vl_dir.parent], device="cpu", dtype="bf16")
    assert bundle.dtype == torch.bfloat16 and next(bundle.model.parameters()).dtype == torch.bfloat16
    from PIL import Image

    from qwen_identity.core.identity.features import FeatureSettings, extract_features

    for source in ("merger_pooled", "llm_hidden"):  # bf16 weights still give float32 unit-norm features
        f = extract_features(bundle, [Image.new("RGB", (50, 70), (30, 40, 50))],
                             FeatureSettings(source=source, resolution="pixel_budget", crop="full", max_pixels=64 * 64))
        assert f.combined.dtype == torch.float32 and abs(float(f.combined.norm()) - 1) < 1e-5


def test_qwen_image_text_encoder_folder_names_its_model_type(tiny_qwenimage_dir):
    with pytest.raises(UserInputError, match=r"model_type 'qwen2_5_vl'.*Qwen3-VL checkpoint is expected"):
        load_qwen3vl(str(tiny_qwenimage_dir / "text_encoder"), device="cpu")


def test_diffusers_pipeline_folder_is_refused(tiny_qwenimage_dir):
    with pytest.raises(UserInputError, match="diffusers pipeline"):
        load_qwen3vl(str(tiny_qwenimage_dir), device="cpu")


def test_model_type_is_checked_before_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserInputError, match="model_type 'llama'"):
        load_qwen3vl(str(tmp_path), device="cpu")  # no weights at all: the type error comes first
    assert check_model_type(tmp_path, {"model_type": "qwen3_vl_moe"}) == "qwen3_vl_moe"


def test_missing_shard_is_named(vl_copy):
    (vl_copy / "model.safetensors").rename(vl_copy / "model-00001-of-00002.safetensors")
    (vl_copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserInputError, match=r"missing 1 of its 2 weight shards \(model-00002-of-00002"):
        load_qwen3vl(str(vl_copy), device="cpu")


def test_truncated_weights_are_reported(vl_copy):
    f = vl_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserInputError, match="truncated"):
        load_qwen3vl(str(vl_copy), device="cpu")
    f.write_bytes(b"\x00" * 4)
    with pytest.raises(UserInputError, match="damaged"):
        load_qwen3vl(str(vl_copy), device="cpu")


def test_no_weights_or_only_pickles(vl_copy):
    (vl_copy / "model.safetensors").unlink()
    with pytest.raises(UserInputError, match="has no weights"):
        load_qwen3vl(str(vl_copy), device="cpu")
    (vl_copy / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserInputError, match="pickle"):
        load_qwen3vl(str(vl_copy), device="cpu")


def test_missing_processor_files(vl_copy):
    (vl_copy / "processor_config.json").unlink()
    with pytest.raises(UserInputError, match="preprocessor_config.json"):
        load_qwen3vl(str(vl_copy), device="cpu")


def test_not_found_and_bad_options(tiny_qwen3vl_dir, tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_qwen3vl(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(UserInputError, match="attention"):
        load_qwen3vl(str(tiny_qwen3vl_dir), device="cpu", attn_implementation="magic")


def test_flash_attention_without_package(tiny_qwen3vl_dir, monkeypatch):
    from qwen_identity.core.identity import qwen3vl

    monkeypatch.setattr(qwen3vl, "flash_attention_available", lambda: False)
    assert "flash_attention_2" not in qwen3vl.attention_choices()
    with pytest.raises(UserInputError, match="flash-attn"):
        load_qwen3vl(str(tiny_qwen3vl_dir), device="cpu", attn_implementation="flash_attention_2")


def test_class_fallback_and_old_transformers(tiny_qwen3vl_dir, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "Qwen3VLForConditionalGeneration", None)
    bundle = load_qwen3vl(str(tiny_qwen3vl_dir), device="cpu")  # through AutoModelForImageTextToText
    assert type(bundle.model).__name__ == "Qwen3VLForConditionalGeneration"
    monkeypatch.setattr(transformers, "__version__", "4.51.3")
    with pytest.raises(UserInputError, match=r"transformers >= 4\.57.*4\.51\.3"):
        load_qwen3vl(str(tiny_qwen3vl_dir), device="cpu")
