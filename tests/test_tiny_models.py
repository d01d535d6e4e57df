"""The tiny stand-ins have the real architectures and on-disk layout, and load with from_pretrained."""

import json

import torch


def test_tokenizer_template_prefix_is_34_tokens(tiny_text_encoder):
    from qwen_identity.tiny_models.tokenizer import QWENIMAGE_TEMPLATE

    _, tokenizer = tiny_text_encoder
    assert len(tokenizer(QWENIMAGE_TEMPLATE.split("{}")[0]).input_ids) == 34


def test_qwen3vl_layout_and_from_pretrained(tiny_qwen3vl_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = json.loads((tiny_qwen3vl_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl"
    assert (tiny_qwen3vl_dir / "model.safetensors").is_file()
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen3vl_dir)
    processor = AutoProcessor.from_pretrained(tiny_qwen3vl_dir)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert model.config.vision_config.out_hidden_size == model.config.text_config.hidden_size


def test_qwenimage_layout_and_from_pretrained(tiny_qwenimage_dir):
    from diffusers import QwenImagePipeline

    index = json.loads((tiny_qwenimage_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_qwenimage_dir / part).is_dir(), part
    pipe = QwenImagePipeline.from_pretrained(tiny_qwenimage_dir)
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder.config.text_config.hidden_size
    assert type(pipe.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_synthetic_dataset_layout(make_dataset):
    dirs = make_dataset(identities=2, views=3, captions={0: "a person with red hair"})
    assert [d.name for d in dirs] == ["seed_100", "seed_101"]
    assert sorted(p.name for p in dirs[0].glob("photo_view_*.png")) == ["photo_view_0.png", "photo_view_1.png",
                                                                       "photo_view_2.png"]
    assert (dirs[0] / "caption.txt").read_text() == "a person with red hair"
    assert not (dirs[1] / "caption.txt").exists()


def test_tiny_models_build_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from qwen_identity.tiny_models.qwen3vl import save_tiny_qwen3vl
    from qwen_identity.tiny_models.tokenizer import build_tokenizer

    tok = build_tokenizer()
    save_tiny_qwen3vl(tmp_path / "a", tok)
    save_tiny_qwen3vl(tmp_path / "b", tok)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
