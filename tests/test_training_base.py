"""The base-model training command: tiny end-to-end runs, resumption, checkpoints, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load, load_file
from transformers import CLIPTokenizer

from hypersd.shapes import fixed_captions
from training import base
from training.checkpoint import load_checkpoint, save_checkpoint
from training.tokenizer import grammar_words, write_tokenizer

TINY = [
    "train_images=64",
    "vae_channels=8,16,16,16",
    "vae_steps=2",
    "vae_batch_size=4",
    "text_width=32",
    "text_layers=1",
    "text_heads=2",
    "decoder_steps=2",
    "unet_channels=32,32,32",
    "unet_batch_size=4",
    "warmup_steps=1",
    "checkpoint_every=1",
    "sample_every=1000",
    "log_every=1",
    "threads=1",
]


def run_base(tmp_path: Path, *overrides: str) -> int:
    return base.main(
        [f"out_dir={tmp_path / 'run'}", f"export_dir={tmp_path / 'export'}", *TINY, *overrides]
    )


def unet_step(tmp_path: Path) -> int:
    return int(json.loads((tmp_path / "run/unet/checkpoint/state.json").read_text())["step"])


def test_base_training_exports_a_pipeline_diffusers_loads(tmp_path: Path) -> None:
    assert run_base(tmp_path, "unet_steps=2") == 0
    export = tmp_path / "export"
    assert not list(export.rglob("*.bin")), "weights must be safetensors only"
    config = json.loads((export / "training_config.json").read_text())
    assert config["unet_steps"] == 2 and config["unet_channels"] == [32, 32, 32]

    pipeline = StableDiffusionPipeline.from_pretrained(export, use_safetensors=True)
    image = pipeline(
        fixed_captions(1)[0],
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3)
    assert pipeline.vae.config.scaling_factor != pytest.approx(0.18215)  # measured, not SD's

    # The decoder fine-tune changes the decoder only: the UNet's latent space stays put.
    vae = load_file(tmp_path / "run/vae/final/diffusion_pytorch_model.safetensors")
    tuned = load_file(tmp_path / "run/vae/decoder/final/diffusion_pytorch_model.safetensors")
    for key, tensor in vae.items():
        same = torch.equal(tensor, tuned[key])
        assert same == key.startswith(("encoder.", "quant_conv.")), key


def test_base_training_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    assert run_base(tmp_path, "unet_steps=2") == 0
    vae_before = (tmp_path / "run/vae/final/diffusion_pytorch_model.safetensors").read_bytes()
    assert unet_step(tmp_path) == 2

    assert run_base(tmp_path, "unet_steps=4") == 0
    assert unet_step(tmp_path) == 4
    # The finished autoencoder phase is reused, not trained again.
    vae_after = (tmp_path / "run/vae/final/diffusion_pytorch_model.safetensors").read_bytes()
    assert vae_after == vae_before
    logged = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["phase"] == "unet"] == [0, 1, 2, 3]


def test_export_checkpoint_writes_the_ema_weights(tmp_path: Path) -> None:
    assert run_base(tmp_path, "unet_steps=2") == 0
    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "export", use_safetensors=True)
    ema = load_file(tmp_path / "run/unet/checkpoint/ema.safetensors")
    again_args = [f"out_dir={tmp_path / 'run'}", f"export_dir={tmp_path / 'again'}", *TINY]
    assert base.main([*again_args, "unet_steps=2", "--export-checkpoint"]) == 0
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "again", use_safetensors=True)
    for a, b in zip(exported.unet.parameters(), again.unet.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    # The EMA weights are the first ones of the list: the UNet's, in parameter order.
    torch.testing.assert_close(next(again.unet.parameters()), ema["0"])


def test_checkpoint_round_trip_restores_optimizer_state(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    save_checkpoint(
        tmp_path / "ckpt",
        step=7,
        config={"a": 1},
        modules={"m": model},
        optimizers={"m": optimizer},
    )
    restored = torch.nn.Linear(3, 2)
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=0.5)
    state = load_checkpoint(
        tmp_path / "ckpt", modules={"m": restored}, optimizers={"m": restored_optimizer}
    )
    assert state["step"] == 7 and state["config"] == {"a": 1}
    torch.testing.assert_close(restored.weight, model.weight)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(
            restored_optimizer.state[restored.weight][key], optimizer.state[model.weight][key]
        )
    assert restored_optimizer.param_groups[0]["lr"] == 0.1
    assert not list((tmp_path / "ckpt").glob("*.pt")) and not list(tmp_path.glob("*.tmp"))


def test_tokenizer_makes_each_grammar_word_one_token(tmp_path: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path / "tok", max_length=24))
    assert tokenizer.model_max_length == 24
    for word in grammar_words():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == [f"{word}</w>"]
    # Text outside the grammar still tokenizes (byte by byte), never to unknown tokens.
    ids = tokenizer("Hello, wörld!", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids).replace(" ", "") == "hello,wörld!"
    assert tokenizer.unk_token_id not in ids


def test_only_decoder_runs_the_decoder_phase_alone(tmp_path: Path) -> None:
    assert run_base(tmp_path, "unet_steps=2", "--only", "decoder") == 0
    tuned_path = tmp_path / "run/vae/decoder/final/diffusion_pytorch_model.safetensors"
    assert tuned_path.exists()
    assert not (tmp_path / "run/unet").exists() and not (tmp_path / "export").exists()
    tuned = tuned_path.read_bytes()
    # The full run then exports that decoder instead of training it again.
    assert run_base(tmp_path, "unet_steps=2") == 0
    assert tuned_path.read_bytes() == tuned
    exported = load_file(tmp_path / "export/vae/diffusion_pytorch_model.safetensors")
    for key, tensor in load(tuned).items():
        torch.testing.assert_close(exported[key], tensor)
