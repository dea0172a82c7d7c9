"""Model loading (streamdiff/models.py, hub.py, tiny.py): hub ids, VAE choice, LoRA fusing, dtypes, the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from streamdiff import ConfigError, LoraSpec, ModelLoadError, StreamConfig, StreamPipeline, load_model
from streamdiff.testing import (
    stream_frames,
    fake_hub_cache,
    random_lora,
    save_kohya_lora,
    save_lora,
    save_tiny_model,
    small_kl_vae,
    tiny_components,
)
from streamdiff.models.tiny import tiny_random_model_path

SIZE = 64
Q = "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def base_frames(tiny_folder, frames_module) -> torch.Tensor:
    return stream_frames(load_model(str(tiny_folder)), frames_module[:4])


@pytest.fixture(scope="module")
def frames_module() -> list:
    import numpy as np

    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return [np.stack([(xx + 8 * i) % 256, yy * 3 % 256, (xx * yy + 17 * i) % 256], -1).astype(np.uint8) for i in range(4)]


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty private Hugging Face cache (the hub client reads HF_HUB_CACHE once at import, hence the patch)."""
    from huggingface_hub import constants

    path = tmp_path / "hub"
    path.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return path


# -- hub ids ----------------------------------------------------------------------------------------------------------


def test_hub_id_loads_from_the_cache_offline(hub_cache, tiny_folder, frames_module, base_frames) -> None:
    fake_hub_cache(hub_cache, "someorg/tiny-sd", tiny_folder)
    model = load_model("someorg/tiny-sd")
    assert model.model_id == "someorg/tiny-sd"
    assert torch.equal(stream_frames(model, frames_module[:4]), base_frames)


def test_unknown_hub_id_offline_fails_fast_and_says_how_to_fix(hub_cache) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model("nobody/no-such-model")
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert "'nobody/no-such-model'" in message and "HF_HUB_OFFLINE" in message
    assert "huggingface-cli download nobody/no-such-model" in message and str(hub_cache) in message


def test_unknown_hub_id_online_fails_fast_without_hanging(tmp_path) -> None:
    """HF_HUB_OFFLINE unset: the download is tried and fails (no network here) with a clear error, bounded in time."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), STREAMDIFF_CACHE=str(tmp_path / "sd"))
    code = (
        "import time; from streamdiff import load_model, ModelLoadError\n"
        "t = time.perf_counter()\n"
        "try:\n    load_model('nobody/no-such-model')\n"
        "except ModelLoadError as e:\n    print('ERR', round(time.perf_counter() - t, 2), e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
    assert done.stdout.startswith("ERR"), done.stderr[-2000:]
    assert "'nobody/no-such-model'" in done.stdout and "downloading it failed" in done.stdout
    assert float(done.stdout.split()[1]) < 30.0


def test_vae_by_hub_id(hub_cache, tiny_folder, tmp_path) -> None:
    small_kl_vae(0).save_pretrained(tmp_path / "kl")
    fake_hub_cache(hub_cache, "someorg/small-kl", tmp_path / "kl")
    model = load_model(str(tiny_folder), vae="someorg/small-kl")
    assert type(model.vae).__name__ == "AutoencoderKL"


# -- invalid settings -------------------------------------------------------------------------------------------------


def test_each_invalid_setting_raises_the_clear_error(tmp_path, tiny_folder, hub_cache) -> None:
    with pytest.raises(ModelLoadError, match=r"model '/no/such/model' is not an existing file or folder"):
        load_model("/no/such/model")
    text_file = tmp_path / "model.txt"
    text_file.write_text("x")
    with pytest.raises(ModelLoadError, match=r"model\.txt is not a \.safetensors or \.ckpt checkpoint"):
        load_model(str(text_file))
    partial = tmp_path / "partial"
    (partial / "unet").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match=r"lacks the diffusers component folder\(s\) \['vae', 'text_encoder'"):
        load_model(str(partial))
    with pytest.raises(ModelLoadError, match=r"LoRA '/no/such/lora.safetensors' is not an existing file"):
        load_model(str(tiny_folder), loras=[("/no/such/lora.safetensors", 1.0)])
    (tmp_path / "emptyvae").mkdir()
    with pytest.raises(ModelLoadError, match=r"emptyvae has no config.json"):
        load_model(str(tiny_folder), vae=str(tmp_path / "emptyvae"))
    with pytest.raises(ConfigError, match=r"LoRA 'x' scale=nan must be a finite number"):
        LoraSpec("x", float("nan"))
    with pytest.raises(ConfigError, match=r"LoRA \('a', 1, 2\) must be a LoraSpec"):
        load_model(str(tiny_folder), loras=[("a", 1, 2)])


# -- VAE choice -------------------------------------------------------------------------------------------------------


def test_vae_choice_by_config_class(tmp_path, tiny_folder, frames_module, base_frames) -> None:
    small_kl_vae(0).save_pretrained(tmp_path / "kl")
    tiny_components(0)["vae"].save_pretrained(tmp_path / "taesd")
    tiny_components(5)["vae"].save_pretrained(tmp_path / "taesd5")
    kl = load_model(str(tiny_folder), vae=str(tmp_path / "kl"))
    same = load_model(str(tiny_folder), vae=str(tmp_path / "taesd"))
    other = load_model(str(tiny_folder), vae=str(tmp_path / "taesd5"))
    assert type(kl.vae).__name__ == "AutoencoderKL" and type(other.vae).__name__ == "AutoencoderTiny"
    kl_frames, same_frames, other_frames = (stream_frames(m, frames_module[:4]) for m in (kl, same, other))
    assert kl_frames.shape == same_frames.shape == base_frames.shape == (3, 3, SIZE, SIZE)
    assert torch.equal(same_frames, base_frames)
    # Another VAE gives other frames (the same VAE gives bit-identical ones above). Both tiny VAEs pass the picture
    # through and differ only in their faint texture, so their frames differ by a few hundredths.
    assert (kl_frames - base_frames).abs().max() > 0.05 and (other_frames - base_frames).abs().max() > 0.02
    assert len({kl.fingerprint, same.fingerprint, other.fingerprint}) == 3


# -- LoRAs ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Two random U-Net LoRAs (rank 4, alpha 8): one in diffusers' format, one in the kohya format."""
    folder = tmp_path_factory.mktemp("loras")
    unet = tiny_components(0)["unet"]
    first, second = random_lora(unet, seed=11), random_lora(unet, seed=12)
    return {
        "first": (save_lora(first, folder / "first"), first),
        "second": (save_kohya_lora(second, folder / "second.safetensors"), second),
        "base": {k: v.clone() for k, v in unet.state_dict().items()},
    }


def _delta(state: dict[str, torch.Tensor], module: str, scale: float, rank: int = 4, alpha: float = 8.0):
    return scale * (state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]) * (alpha / rank)


def test_loras_fuse_to_the_hand_computed_weights(tiny_folder, loras) -> None:
    (path1, state1), (path2, state2) = loras["first"], loras["second"]
    model = load_model(str(tiny_folder), loras=[(str(path1), 0.7), LoraSpec(str(path2), -0.4)])
    fused = model.unet.state_dict()
    for name in (Q, "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", "up_blocks.0.attentions.1."
                 "transformer_blocks.0.attn2.to_k"):
        expected = loras["base"][f"{name}.weight"] + _delta(state1, name, 0.7) + _delta(state2, name, -0.4)
        assert (fused[f"{name}.weight"] - expected).abs().max() < 1e-6
        assert (fused[f"{name}.weight"] - loras["base"][f"{name}.weight"]).abs().max() > 1e-3
    assert torch.equal(fused["conv_in.weight"], loras["base"]["conv_in.weight"])
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in model.unet.modules())
    assert type(model.unet.get_submodule(Q)) is torch.nn.Linear
    assert set(fused) == set(loras["base"])


def test_lora_scale_zero_gives_the_base_frames(tiny_folder, loras, frames_module, base_frames) -> None:
    path = str(loras["first"][0])
    zero = load_model(str(tiny_folder), loras=[(path, 0.0)])
    one = load_model(str(tiny_folder), loras=[(path, 1.0)])
    assert (stream_frames(zero, frames_module[:4]) - base_frames).abs().max() <= 1e-6
    assert (stream_frames(one, frames_module[:4]) - base_frames).abs().max() > 1e-3
    base = load_model(str(tiny_folder))
    assert len({base.fingerprint, zero.fingerprint, one.fingerprint}) == 3
    assert load_model(str(tiny_folder), loras=[(path, 1.0)]).fingerprint == one.fingerprint


def test_lora_fused_in_float32_then_cast(tiny_folder, loras) -> None:
    path, state = loras["first"]
    model = load_model(str(tiny_folder), loras=[(str(path), 1.0)], dtype=torch.bfloat16)
    assert {p.dtype for p in model.unet.parameters()} == {torch.bfloat16}
    expected = (loras["base"][f"{Q}.weight"] + _delta(state, Q, 1.0)).to(torch.bfloat16)
    assert torch.equal(model.unet.get_submodule(Q).weight, expected)


def test_lora_by_hub_id(hub_cache, tiny_folder, loras) -> None:
    path, _ = loras["first"]
    fake_hub_cache(hub_cache, "someorg/lcm-lora-tiny", path.parent)
    by_id = load_model(str(tiny_folder), loras=[("someorg/lcm-lora-tiny", 0.5)])
    by_path = load_model(str(tiny_folder), loras=[(str(path), 0.5)])
    assert torch.equal(by_id.unet.get_submodule(Q).weight, by_path.unet.get_submodule(Q).weight)

# -- dtype and device -------------------------------------------------------------------------------------------------


def test_float32_default_and_bfloat16_close(tiny_folder, frames_module, base_frames) -> None:
    default = load_model(str(tiny_folder))
    assert default.dtype == torch.float32 and default.device == torch.device("cpu")
    assert {p.dtype for p in default.unet.parameters()} == {torch.float32}
    bf16 = load_model(str(tiny_folder), dtype=torch.bfloat16)
    for module in (bf16.unet, bf16.vae, bf16.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    mse = ((stream_frames(bf16, frames_module[:4]) - base_frames) ** 2).mean().item()
    psnr = 10 * torch.log10(torch.tensor(1.0 / mse)).item()
    assert psnr >= 40.0, psnr  # measured 50.1 dB


def test_loading_in_target_dtype_does_not_cast_with_to(tiny_folder, caplog) -> None:
    with caplog.at_level("WARNING"):
        load_model(str(tiny_folder), dtype=torch.bfloat16)
    assert "Casting directly with `to()`" not in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_float16_on_cuda(tiny_folder, frames_module) -> None:
    pipe = StreamPipeline.from_pretrained(str(tiny_folder), StreamConfig(width=SIZE, height=SIZE), device="auto")
    assert pipe.model.dtype == torch.float16 and pipe.model.device.type == "cuda"
    pipe.prepare("a cat")
    assert pipe(frames_module[0]) is not None


# -- the built-in tiny model ------------------------------------------------------------------------------------------


def test_tiny_random_is_deterministic_cached_and_loaded_like_a_folder(tmp_path, frames_module, base_frames) -> None:
    a, b = tiny_random_model_path(tmp_path / "a"), tiny_random_model_path(tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    stamps = {f: (a / f).stat().st_mtime_ns for f in files}
    assert tiny_random_model_path(tmp_path / "a") == a
    assert stamps == {f: (a / f).stat().st_mtime_ns for f in files}  # not rebuilt
    assert [p.name for p in a.parent.iterdir()] == [a.name]  # no staging folder left
    model = load_model("tiny-random", cache_dir=tmp_path / "a")
    assert torch.equal(stream_frames(model, frames_module[:4]), base_frames)  # same seed as save_tiny_model(seed=0)


def test_tiny_first_use_from_two_processes_at_once(tmp_path) -> None:
    code = "import sys; from streamdiff.models.tiny import tiny_model_path; print(tiny_model_path())"
    env = {**os.environ, "STREAMDIFF_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    folder = Path(outs[0][0].strip())
    assert Path(outs[1][0].strip()) == folder and (folder / "model_index.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    load_model(str(folder))


# -- prediction types -------------------------------------------------------------------------------------------------


def _with_prediction_type(folder: Path, target: Path, kind: str) -> Path:
    shutil.copytree(folder, target)
    config_file = target / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["prediction_type"] = kind
    config_file.write_text(json.dumps(config))
    return target


def test_v_prediction_models_load_and_use_their_formula(tmp_path, tiny_folder, frames_module, base_frames) -> None:
    """A v-prediction model (SD 2.x at 768, many fine-tunes) gets v's x̂0: other frames than the same weights as ε."""
    from streamdiff.core.schedule import PredictionType

    model = load_model(str(_with_prediction_type(tiny_folder, tmp_path / "v", "v_prediction")))
    assert model.schedule.prediction_type is PredictionType.V_PREDICTION
    frames = stream_frames(model, frames_module[:4])
    assert frames.shape == base_frames.shape and torch.isfinite(frames).all()
    assert (frames - base_frames).abs().max() > 0.05


def test_unknown_prediction_type_is_refused_at_load(tmp_path, tiny_folder) -> None:
    with pytest.raises(ModelLoadError, match=r"prediction_type='flow'; streamdiff supports 'epsilon', 'v_prediction', "
                                             r"'sample'"):
        load_model(str(_with_prediction_type(tiny_folder, tmp_path / "flow", "flow")))
