"""core/pipeline: the offline loop's unit of work is a list of identities and a separate merge step, so
chunks run apart (other processes, other machines) give the same files as one run; one duplicate-name
check; defaults; the cache key scheme."""

from __future__ import annotations

import json

import pytest
import torch

from qwen_identity.core.errors import UserInputError
from qwen_identity.core.identity.seed_dirs import load_seed_dirs
from qwen_identity.core.pipeline import cache_keys, defaults
from qwen_identity.core.pipeline.run import (RunSettings, check_unique_names, merge_results, run_identities)


def _head(path, d=64, h=32):
    from qwen_identity.core.residual.head import HeadMeta, ResidualHead, save_head

    torch.manual_seed(0)
    meta = HeadMeta(feature_dim=d, tokens=1, hidden_size=h, qwen3_vl_model="tiny",
                    feature_settings={"source": "merger_pooled", "resolution": "pixel_budget", "max_pixels": 64 * 64})
    head = ResidualHead(d, 1, h, meta=meta)
    with torch.no_grad():
        head.proj.weight.normal_(0, 2.0)
    return save_head(head, path)


def test_chunks_merged_equal_one_run(tiny_models, make_dataset, tmp_path):
    dirs = load_seed_dirs(make_dataset(identities=2, views=1, size=(64, 64)))
    settings = RunSettings(head=_head(tmp_path / "head.safetensors"), alphas=[0.0, 1.0], seeds=[3], steps=2,
                           width=32, height=32, qwen3_vl_model=str(tiny_models.qwen3vl),
                           qwen_image_model=str(tiny_models.qwen_image), device="cpu", dtype="fp32")
    whole = run_identities(dirs, settings, tmp_path / "whole", say=lambda m: None)
    merge_results(tmp_path / "whole", whole, settings)
    for d in dirs:  # each identity on its own, as separate workers would, then one merge reading their files
        run_identities([d], settings, tmp_path / "split", say=lambda m: None)
    merged = merge_results(tmp_path / "split")
    for d in dirs:
        name = f"{d.name}_alpha_grid.png"
        assert (tmp_path / "whole" / "generations" / name).read_bytes() == \
            (tmp_path / "split" / "generations" / name).read_bytes()
    doc = json.loads(merged.read_text())
    assert [i["identity"] for i in doc["identities"]] == [d.name for d in dirs]
    assert doc["run"]["alphas"] == [0.0, 1.0] and doc["run"]["head"] == str(settings.head)


def test_merge_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="nothing to merge"):
        merge_results(tmp_path)


def test_duplicate_folder_names_are_refused_once_for_every_command(tmp_path):
    from qwen_identity.core.identity.seed_dirs import load_seed_dir

    for parent in ("a", "b"):
        d = tmp_path / parent / "seed_1"
        d.mkdir(parents=True)
        from PIL import Image

        Image.new("RGB", (8, 8)).save(d / "photo_view_0.png")
    with pytest.raises(UserInputError, match="share a folder name"):
        check_unique_names([load_seed_dir(tmp_path / "a" / "seed_1"), load_seed_dir(tmp_path / "b" / "seed_1")])


def test_defaults_name_qwen3vl_and_qwen_image_and_keep_the_seed_prompts():
    """The seed's model ids were wrong (Qwen2-VL, Qwen2.5-7B-Instruct); its prompts are kept."""
    assert defaults.DEFAULT_QWEN3_VL.startswith("Qwen/Qwen3-VL-") and defaults.DEFAULT_QWEN_IMAGE == "Qwen/Qwen-Image"
    assert defaults.DEFAULT_BASE_PROMPT == "a portrait photo of a person, studio lighting, 85mm"
    assert defaults.DEFAULT_NEGATIVE_PROMPT == "blurry, low quality, deformed, watermark"


def test_target_key_includes_dtype_and_model_folder_not_its_spelling(tiny_models, tmp_path):
    """A bf16 target cache is never reused by an fp32 run; the same folder by path or by models-folder name is
    one key."""
    qi = tiny_models.qwen_image
    k32 = cache_keys.target_key(str(qi), "p", ["p, x"], 1, "segment-mean-v1", torch.float32)
    assert k32 != cache_keys.target_key(str(qi), "p", ["p, x"], 1, "segment-mean-v1", torch.bfloat16)
    assert k32 == cache_keys.target_key(qi.name, "p", ["p, x"], 1, "segment-mean-v1", "float32",
                                        search_dirs=[qi.parent])
