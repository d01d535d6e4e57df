"""`qwen-identity train --objective denoise` on the tiny models: seed dirs -> caches -> head through the
frozen transformer -> the same head format LoadResidualHead reads; byte-identical reruns; resume from a
mid-run checkpoint equals an uninterrupted run; caches keyed by model/resolution/dtype/content; the bad
inputs of issue 12 (one photo per person, small photos, no face with face weighting, a text-width
mismatch, 24 GB options) are clear errors that write nothing."""

import functools
import json
import shutil

import pytest
import torch

from qwen_identity.cli import main
from qwen_identity.core.residual.model_card import head_path

BASE = ["--objective", "denoise", "--train-resolution", "32x32", "--batch-size", "2", "--lr", "1e-2",
        "--device", "cpu", "--val-fraction", "0.34", "--gain-pairs", "2", "--crop", "center"]  # synthetic: no faces


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def train(tiny_models, run_cli):
    def run(*args, out, epochs=2, qwen_image=None):
        argv = ["train", "--qwen3-vl-model", str(tiny_models.qwen3vl), "--qwen-image-model",
                str(qwen_image or tiny_models.qwen_image), "--epochs", str(epochs), *BASE, "--out-dir", str(out), *args]
        return run_cli(argv)

    return run


@pytest.fixture
def people(make_dataset):
    return ",".join(str(d) for d in make_dataset(identities=3, views=2, size=(40, 36)))


@pytest.fixture(params=["qwen-image", "qwen-image-2.1"])
def family_model(request, tiny_models):
    """(family name, tiny diffusers folder) of each model family; the 2.1 folder is built only when asked for."""
    if request.param == "qwen-image":
        return request.param, tiny_models.qwen_image
    return request.param, request.getfixturevalue("tiny_qwenimage21_dir")


def test_denoise_trains_a_head_the_nodes_load(train, people, tmp_path):
    from qwen_identity.core.residual.head import load_head

    code, out, err = train("--seed-dirs", people, out=tmp_path / "a")
    assert code == 0, err
    head_file = head_path(tmp_path / "a")
    head = load_head(head_file)
    assert head.meta.target == "denoise" and head.meta.hidden_size == 32
    args = head.meta.training_args
    assert args["objective"] == "denoise" and args["resolution"] == "32x32" and args["alpha_train"] == 1.0
    assert args["sigma_sampling"]["weighting"] == "logit_normal" and args["tokens"] == 1
    assert len(args["identities"]) == 3 and len(args["held_out"]) == 1
    assert float(head.proj.weight.detach().abs().sum()) > 0  # the loss moved the head
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert len(metrics["history"]["train_loss"]) == 2
    g = metrics["held_out_gain"]
    assert g is not None and g["photos"] == 2 and "identity_gain_ci95" in g
    assert "text_token_rms" in metrics
    # caches exist with model/resolution keys in their names
    names = sorted(p.name for p in (tmp_path / "a" / "cache").iterdir())
    assert any(n.startswith("latents-") for n in names) and any(n.startswith("prompts-") for n in names)

    # InjectResidual takes the head unchanged
    from qwen_identity.core.identity.features import IdentityFeatures
    from qwen_identity.core.residual.injection import inject_identity

    v = torch.nn.functional.normalize(torch.randn(head.feature_dim), dim=0)
    feats = IdentityFeatures(per_image=v[None], combined=v, weights=None,
                             meta={"feature_dim": head.feature_dim, **head.meta.feature_settings})
    cond = [[torch.randn(1, 5, 32), {"pooled_output": None}]]
    out_cond, _ = inject_identity(cond, head, feats, [1.0])
    assert out_cond[0][0].shape == (1, 5, 32)


def test_reruns_are_byte_identical_and_resume_equals_uninterrupted(train, people, tmp_path, monkeypatch, family_model):
    family, model = family_model
    train = functools.partial(train, qwen_image=model)
    assert train("--seed-dirs", people, out=tmp_path / "a", epochs=3)[0] == 0
    shutil.copytree(tmp_path / "a" / "cache", tmp_path / "b" / "cache")  # same caches, fresh run
    assert train("--seed-dirs", people, out=tmp_path / "b", epochs=3)[0] == 0
    head = lambda d: head_path(d).read_bytes()  # noqa: E731
    assert head(tmp_path / "a") == head(tmp_path / "b")

    # interrupted after optimizer step 2 (mid-epoch 2: 2 photos per epoch... 4 train photos / batch 2 = 2 steps)
    from qwen_identity.training import denoise_pipeline

    real = denoise_pipeline.train_denoise

    def interrupted(*a, **kw):
        kw["stop_after_step"] = 3
        return real(*a, **kw)

    shutil.copytree(tmp_path / "a" / "cache", tmp_path / "c" / "cache")
    monkeypatch.setattr(denoise_pipeline, "train_denoise", interrupted)
    assert train("--seed-dirs", people, "--checkpoint-every", "1", out=tmp_path / "c", epochs=3)[0] == 0
    monkeypatch.setattr(denoise_pipeline, "train_denoise", real)
    state = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert state["step"] == 3
    code, _, err = train("--seed-dirs", people, "--checkpoint-every", "1", "--resume", out=tmp_path / "c", epochs=3)
    assert code == 0, err
    assert "resuming after optimizer step 3" in err
    from qwen_identity.core.residual.head import load_head

    a, c = load_head(head_path(tmp_path / "a")), \
        load_head(head_path(tmp_path / "c"))
    assert torch.equal(a.proj.weight, c.proj.weight) and torch.equal(a.proj.bias, c.proj.bias)
    assert c.meta.family == family and float(c.proj.weight.detach().abs().sum()) > 0
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())["history"]
    mc = json.loads((tmp_path / "c" / "metrics.json").read_text())["history"]
    assert ma == mc


def test_caches_are_keyed_by_resolution_model_and_dtype(train, people, tmp_path, tiny_models):
    from qwen_identity.core.denoising.latent_cache import Resolution, vae_key
    from qwen_identity.core.denoising.prompt_cache import prompt_key

    assert train("--seed-dirs", people, out=tmp_path / "a", epochs=1)[0] == 0
    first = {p.name for p in (tmp_path / "a" / "cache").iterdir()}
    code, _, err = train("--seed-dirs", people, "--overwrite", "--train-resolution", "32x16", out=tmp_path / "a",
                         epochs=1)
    assert code == 0, err
    second = {p.name for p in (tmp_path / "a" / "cache").iterdir()}
    new_latents = [n for n in second - first if n.startswith("latents-")]
    assert len(new_latents) == 1 and "encoding" in err and "VAE at 32x16" in err  # not reused: encoded again
    # keys differ by every ingredient
    src = {"model": {"source": "x", "config": "1"}}
    keys = {vae_key(src, Resolution(32, 32), "float32"), vae_key(src, Resolution(48, 32), "float32"),
            vae_key(src, Resolution(32, 32), "bfloat16"),
            vae_key({"model": {"source": "x", "config": "2"}}, Resolution(32, 32), "float32")}
    assert len(keys) == 4
    assert prompt_key(src, "float32", ["a"]) != prompt_key(src, "bfloat16", ["a"]) != prompt_key(src, "float32", ["b"])
    # a warm rerun loads no VAE / text encoder
    code, _, err = train("--seed-dirs", people, "--overwrite", out=tmp_path / "a", epochs=1)
    assert code == 0 and "encoding" not in err and "extracting" not in err


@pytest.mark.parametrize("case", ["one photo", "small photo", "no face", "compile", "compile+fp8", "offload", "resolution"])
def test_bad_input_is_a_clear_error_that_writes_nothing(train, make_dataset, tmp_path, case):
    extra = []
    if case == "one photo":
        dirs = make_dataset(identities=2, views=1, size=(40, 36))
        message = "--single-photo flip"
    elif case == "small photo":
        dirs = make_dataset(identities=2, views=2, size=(20, 36))
        message = "smaller than the training resolution"
    elif case == "no face":
        dirs = make_dataset(identities=2, views=2, size=(40, 36))
        extra = ["--face-weight", "3"]
        message = "no face found"
    else:
        dirs = make_dataset(identities=2, views=2, size=(40, 36))
        extra, message = {"compile": (["--compile"], "--compile needs a CUDA GPU"),
                          "compile+fp8": (["--compile", "--fp8-storage"], "--compile and --fp8-storage do not combine"),
                          "offload": (["--offload", "group"], "--offload group is not supported"),
                          "resolution": (["--train-resolution", "30x32"], "multiples of 16")}[case]
    code, _, err = train("--seed-dirs", ",".join(map(str, dirs)), *extra, out=tmp_path / "out", epochs=1)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_fp8_storage_and_compiled_blocks_train_like_the_plain_run(train, people, tmp_path, monkeypatch, family_model):
    """--fp8-storage trains on the CPU (layerwise casting, float32 compute) and is recorded; --compile runs
    the same code path as on a GPU with the aot_eager backend (inductor is CUDA only) and gives the plain
    run's head up to float reassociation. Both families, through the family adapter's transformer."""
    from qwen_identity.core.residual.head import load_head
    from qwen_identity.training import denoise_pipeline

    family, model = family_model
    train = functools.partial(train, qwen_image=model)
    head_of = lambda d: load_head(head_path(d))  # noqa: E731
    assert train("--seed-dirs", people, out=tmp_path / "plain", epochs=1)[0] == 0
    plain = head_of(tmp_path / "plain").proj.weight.detach()
    assert head_of(tmp_path / "plain").meta.family == family
    stored = []   # the weight dtypes of the transformer the run trains through (loaded fp8 by the family)
    real_prepare = denoise_pipeline.prepare_transformer
    monkeypatch.setattr(denoise_pipeline, "prepare_transformer",
                        lambda tr, *a, **kw: stored.append({p.dtype for p in tr.parameters()}) or real_prepare(tr, *a, **kw))
    code, _, err = train("--seed-dirs", people, "--fp8-storage", out=tmp_path / "fp8", epochs=1)
    monkeypatch.setattr(denoise_pipeline, "prepare_transformer", real_prepare)
    assert code == 0, err
    assert stored == [{torch.float8_e4m3fn, torch.float32}]   # fp8 storage; norms and embeddings as computed
    fp8 = head_of(tmp_path / "fp8")
    assert fp8.meta.training_args["fp8_storage"] is True and fp8.meta.family == family
    # a different (quantised) transformer, the same direction of learning: 1 epoch of Adam from the same init
    cos = torch.nn.functional.cosine_similarity(fp8.proj.weight.detach().flatten(), plain.flatten(), dim=0)
    assert float(cos) > 0.9, float(cos)

    torch._dynamo.reset()
    from qwen_identity.core.generation import sampling

    calls = []
    original = sampling.compile_transformer
    # the CUDA check passes (recorded), and the blocks compile with aot_eager instead of inductor
    monkeypatch.setattr(denoise_pipeline, "check_compile", lambda device, backend: calls.append(("check", backend)))
    monkeypatch.setattr(denoise_pipeline, "compile_for_training",
                        lambda tr, device, backend: calls.append(("compile", backend, tr)) or original(tr, backend="aot_eager"))
    torch._dynamo.utils.counters.clear()
    code, _, err = train("--seed-dirs", people, "--compile", out=tmp_path / "c", epochs=1)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert code == 0, err
    assert [c[:2] for c in calls] == [("check", "inductor"), ("compile", "inductor")]
    blocks = calls[1][2].transformer_blocks   # every block compiled (fullgraph), and the training ran them so
    assert all(b._compiled_call_impl is not None for b in blocks) and graphs >= 1
    compiled = head_of(tmp_path / "c")
    assert "fp8_storage" not in compiled.meta.training_args  # compile changes no result: not part of the run
    assert torch.allclose(compiled.proj.weight.detach(), plain, rtol=1e-3, atol=1e-5)


def test_single_photo_flip_trains(train, make_dataset, tmp_path):
    dirs = make_dataset(identities=3, views=1, size=(40, 36))
    code, _, err = train("--seed-dirs", ",".join(map(str, dirs)), "--single-photo", "flip", out=tmp_path / "a", epochs=1)
    assert code == 0, err
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["train_photos"] == 4 and m["val_photos"] == 2


def test_text_width_mismatch_is_named(train, people, tmp_path, tiny_models):
    qi = tmp_path / "qi"
    shutil.copytree(tiny_models.qwen_image, qi)
    cfg_file = qi / "transformer" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["joint_attention_dim"] = 48
    cfg_file.write_text(json.dumps(cfg))
    code, _, err = train("--seed-dirs", people, out=tmp_path / "a", epochs=1, qwen_image=qi)
    assert code == 2, err
    assert "width 48" in err and "H=32" in err


def test_eval_measures_the_denoising_gain_of_a_head(train, people, make_dataset, tmp_path, tiny_models, capsys):
    assert train("--seed-dirs", people, out=tmp_path / "a", epochs=1)[0] == 0
    head = head_path(tmp_path / "a")
    others = make_dataset(identities=2, views=2, size=(40, 36), first_seed=300)
    code = main(["eval", "--head", str(head), "--seed-dirs", ",".join(map(str, others)), "--denoise-gain-only",
                 "--qwen3-vl-model", str(tiny_models.qwen3vl), "--qwen-image-model", str(tiny_models.qwen_image),
                 "--device", "cpu", "--gain-pairs", "2", "--out-dir", str(tmp_path / "ev")])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    g = report["denoise_gain"]
    assert g["overall"]["persons"] == 2 and g["overall"]["photos"] == 4
    assert g["settings"]["resolution"] == "32x32"  # the head's training resolution
    assert set(g["per_person"]) == {"seed_300", "seed_301"}
    assert "held-out denoising gain" in out.out


def test_out_of_gpu_memory_names_the_flags_that_reduce_memory(train, people, tmp_path, monkeypatch):
    from qwen_identity.training import denoise_pipeline

    def oom(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(denoise_pipeline, "train_denoise", oom)
    code, _, err = train("--seed-dirs", people, out=tmp_path / "a", epochs=1)
    assert code == 2, err
    assert "out of GPU memory" in err and "--gradient-checkpointing" in err and "--grad-accum" in err
    assert "--train-resolution" in err and "Traceback" not in err


def test_denoise_flags_without_the_denoise_objective_are_refused(train, people, tmp_path, tiny_models, capsys):
    code = main(["train", "--qwen3-vl-model", str(tiny_models.qwen3vl), "--qwen-image-model",
                 str(tiny_models.qwen_image), "--seed-dirs", people, "--face-weight", "2", "--device", "cpu", "--crop", "center",
                 "--out-dir", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "--face-weight applies to --objective denoise only" in err
