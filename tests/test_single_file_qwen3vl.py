"""core/identity/single_file_qwen3vl.py: a Qwen3-VL kept as one safetensors file, as a 2026 ComfyUI has it in
models/text_encoders/ (Hugging Face key layout, vision tower included; or ComfyUI's own names), read into
transformers' Qwen3VLForConditionalGeneration with the config inferred from shapes. Written here from the
tiny random Qwen3-VL, so the converted model must reproduce the original's outputs exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from qwen_identity.core.errors import UserInputError
from qwen_identity.core.identity import single_file_qwen3vl as sf

# the tiny model's sizes that shapes cannot tell (the released ones are the module's defaults)
TINY = dict(deepstack_visual_indexes=[0, 1], rope_parameters={"mrope_section": [4, 2, 2]},
            vision_config={"num_heads": 2})


@pytest.fixture(scope="module")
def original(tiny_qwen3vl_dir):
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_qwen3vl_dir, dtype=torch.float32).eval()
    TINY.update({k: getattr(model.config, k) for k in sf.TOKEN_IDS})   # the tiny tokenizer's own ids
    return model


def _single_file(model, path, comfy_names=False, dtype=None, drop=()):
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k not in drop}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)   # tied: files leave it out
    if comfy_names:
        sd = {("model." + k[len("model.language_model."):]) if k.startswith("model.language_model.")
              else ("visual." + k[len("model.visual."):]) if k.startswith("model.visual.") else k: v
              for k, v in sd.items()}
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    save_file(sd, str(path))
    return path


def _outputs(model, processor):
    from PIL import Image

    img = Image.new("RGB", (64, 64), (200, 30, 90))
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[img], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("comfy_names", [False, True], ids=["hf_layout", "comfyui_layout"])
def test_a_single_file_gives_the_same_model_as_the_folder(original, tiny_qwen3vl_dir, tmp_path, comfy_names):
    from transformers import AutoProcessor

    path = _single_file(original, tmp_path / "qwen3vl_tiny.safetensors", comfy_names=comfy_names)
    header = sf.read_header(path)
    assert sf.is_single_file_qwen3vl(header)
    cfg = sf.infer_config(header, TINY)
    ref = original.config
    for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size"):
        assert cfg["text_config"][k] == getattr(ref.text_config, k), k
    for k in ("depth", "hidden_size", "intermediate_size", "out_hidden_size", "num_position_embeddings",
              "spatial_merge_size", "patch_size", "temporal_patch_size"):
        assert cfg["vision_config"][k] == getattr(ref.vision_config, k), k
    assert cfg["tie_word_embeddings"] is True
    model = sf.load_single_file_model(path, torch.float32, TINY)
    processor = AutoProcessor.from_pretrained(tiny_qwen3vl_dir)
    assert torch.equal(_outputs(model, processor), _outputs(original, processor))


def test_float8_weights_are_widened_with_their_per_tensor_scale(original, tmp_path):
    sd = {k: v for k, v in original.state_dict().items() if k != "lm_head.weight"}
    key = "model.language_model.layers.0.mlp.up_proj.weight"
    w = sd[key]
    scale = w.abs().max() / 448.0
    sd[key] = (w / scale).to(torch.float8_e4m3fn)
    sd[key[: -len(".weight")] + ".weight_scale"] = scale.reshape(())
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "fp8.safetensors"))
    model = sf.load_single_file_model(tmp_path / "fp8.safetensors", torch.float32, TINY)
    got = model.get_parameter(key)
    assert got.dtype == torch.float32
    # e4m3 keeps 3 mantissa bits: each weight within 1/16 of itself (relative), and the scale is applied
    assert torch.allclose(got, w, rtol=0.07, atol=float(scale) * 2 ** -6)
    assert not torch.allclose(got, w / scale)


def test_quantized_and_partial_files_are_refused_with_the_reason(original, tmp_path):
    q = _single_file(original, tmp_path / "q.safetensors")
    sd = {k: v for k, v in original.state_dict().items() if k != "lm_head.weight"}
    sd["model.language_model.layers.0.mlp.up_proj.comfy_quant"] = torch.tensor(list(b'{"format":"int8"}'), dtype=torch.uint8)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(q))
    with pytest.raises(UserInputError, match="quantized for ComfyUI"):
        sf.load_single_file_model(q, torch.float32, TINY)
    text_only = _single_file(original, tmp_path / "text_only.safetensors",
                             drop=[k for k in original.state_dict() if k.startswith("model.visual.")])
    with pytest.raises(UserInputError, match="vision tower"):
        sf.load_single_file_model(text_only, torch.float32, TINY)
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(UserInputError, match="not a readable safetensors"):
        sf.read_header(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("fmt,packed", [({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}, False),
                                        ({"format": "asym_w4a8_int8"}, True)], ids=["int8_convrot", "w4a8"])
def test_comfyuis_smaller_21_text_encoders_are_refused_naming_the_bf16_file(original, tmp_path, fmt, packed):
    """Comfy-Org's Qwen-Image 2.1 text encoder also comes as int8_convrot and w4a8 files: int8 weights (two 4-bit
    values per byte for w4a8) with a per-row weight_scale and a `.comfy_quant` entry per quantized layer. LoadQwen3VL
    cannot read them (their rotation / packing is comfy_kitchen's): the error says so and names the bf16 file."""
    sd = {k: v.contiguous() for k, v in original.state_dict().items() if k != "lm_head.weight"}
    for k in [k for k in sd if ".layers.0." in k and k.endswith("proj.weight")] + ["model.visual.merger.linear_fc1.weight"]:
        w = sd.pop(k)
        cols = w.shape[1] // 2 if packed else w.shape[1]
        base = k[: -len(".weight")]
        sd[k] = torch.randint(-128, 127, (w.shape[0], cols), dtype=torch.int8)
        sd[base + ".weight_scale"] = w.abs().amax(1, keepdim=True).float() / 127
        sd[base + ".comfy_quant"] = torch.tensor(list(json.dumps(fmt).encode()), dtype=torch.uint8)
    path = tmp_path / "qwen3vl_8b_quantized.safetensors"
    save_file(sd, str(path))
    with pytest.raises(UserInputError, match="quantized for ComfyUI") as err:
        sf.load_single_file_model(path, torch.float32, TINY)
    assert sf.BF16_FILE_21 == "qwen3vl_8b_bf16.safetensors" and sf.BF16_FILE_21 in str(err.value)


def test_an_unreleased_vision_depth_needs_its_deepstack_layers(original, tmp_path):
    path = _single_file(original, tmp_path / "x.safetensors")
    with pytest.raises(UserInputError, match="2 blocks with 2 DeepStack"):
        sf.infer_config(sf.read_header(path))
    # the released depths need nothing: the module's table (as ComfyUI's qwen3vl.py) names them
    assert sf.DEEPSTACK_BY_DEPTH[27] == [8, 16, 24] and sf.DEEPSTACK_BY_DEPTH[24] == [5, 11, 17]


def test_the_processor_is_built_from_a_tokenizer_folder(tiny_qwen3vl_dir, tmp_path):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_qwen3vl_dir).save_pretrained(tmp_path / "tok")
    proc = sf.build_processor(tmp_path / "tok")
    assert proc.image_processor.patch_size == 16 and proc.image_processor.merge_size == 2
    assert list(proc.image_processor.image_mean) == [0.5, 0.5, 0.5]
    with pytest.raises(UserInputError, match="qwen25_tokenizer"):
        sf.build_processor(tmp_path)
    json.dumps(sf.TOKEN_IDS)   # the ids are plain ints a config.json can hold


def test_load_qwen3vl_node_reads_a_single_file_and_extracts_the_same_features(original, tiny_qwen3vl_dir, tmp_path):
    """The bundle from the file (tokenizer from a folder, as ComfyUI's qwen25_tokenizer) extracts exactly the
    features the Hugging Face folder gives; the node without ComfyUI says what it is missing."""
    from PIL import Image
    from transformers import AutoTokenizer

    from qwen_identity.core.identity import features
    from qwen_identity.core.identity.qwen3vl import load_qwen3vl
    from qwen_identity.nodes.qwen3vl_nodes import LoadQwen3VL

    path = _single_file(original, tmp_path / "qwen3vl_tiny.safetensors")
    AutoTokenizer.from_pretrained(tiny_qwen3vl_dir).save_pretrained(tmp_path / "tok")
    single = sf.load_single_file_bundle(path, tmp_path / "tok", device="cpu", dtype="fp32", overrides=TINY)
    folder = load_qwen3vl(str(tiny_qwen3vl_dir), device="cpu", dtype="fp32")
    assert single.feature_dim == folder.feature_dim and single.model_id == "qwen3vl_tiny"
    photos = [Image.new("RGB", (96, 64), (10 * i, 200, 40)) for i in range(2)]
    for source in features.FEATURE_SOURCES:
        settings = features.FeatureSettings(source=source, crop="center")
        a = features.extract_features(single, photos, settings).per_image
        b = features.extract_features(folder, photos, settings).per_image
        assert a.shape == b.shape and torch.equal(a, b), source
    with pytest.raises(UserInputError, match="no tokenizer inside"):
        LoadQwen3VL().load(model="(none)", model_path=str(path), dtype="fp32", device="cpu")
