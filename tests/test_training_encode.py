"""``hypersd-train encode``: shards of latents + text embeddings, resumable and written atomically,
read by every stage (``data=encoded``) and split across processes; feedback / DMD prompts from
them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_image_captions, write_webdataset

from hypersd.shapes import ShapesDataset
from training import cli, encode
from training.data import (
    EncodedSample,
    TrainingData,
    encode_pixels,
    image_batch,
    next_batch,
    stream_samples,
)
from training.distill import DistillConfig, run
from training.encode import EncodeConfig
from training.enhance import EnhanceConfig
from training.teacher import build_encoder, load_teacher


def encode_config(tiny_models: Any, tmp_path: Path, family: str, **overrides: Any) -> EncodeConfig:
    folder = tmp_path / "wds"
    if not folder.exists():
        write_webdataset(folder, tiny_image_captions(10), shards=2)
    values: dict[str, Any] = {
        "teacher": str(getattr(tiny_models, family)),
        "out_dir": str(tmp_path / "encoded"),
        "data": "webdataset",
        "data_path": str(folder),
        "resolution": 64,
        "bucket_step": 16,
        "crop": "random",
        "shard_size": 2,
        "batch_size": 2,
        "device": "cpu",
        "threads": 1,
    }
    return EncodeConfig(**(values | overrides))


def test_encode_writes_shards_that_match_the_source(tiny_models: Any, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = encode_config(tiny_models, tmp_path, "sdxl")
    args = [f"{k}={v}" for k, v in vars(cfg).items() if v is not None]
    assert cli.main(["encode", *args]) == 0
    out = Path(cfg.out_dir)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["settings"]["family"] == "sdxl"
    shards = sorted(out.glob("*.safetensors"))
    assert meta["shards"] == len(shards) and not list(out.glob("*.partial"))
    # the source's samples, bucketed and cropped as training streams them (same seed)
    source = {s.caption: s for s in stream_samples(cfg, 0, 1, cfg.seed, epochs=1)}
    pipe = load_teacher(cfg.teacher)
    encoder = build_encoder(pipe, torch.device("cpu"), cfg.resolution, ())
    captions = []
    for shard in shards:
        tensors = load_file(str(shard))
        info = json.loads(shard.with_suffix(".json").read_text())
        n, _, h, w = tensors["latents"].shape
        assert shard.name.startswith(f"{h * 8}x{w * 8}-") and n == len(info["captions"]) <= 2
        assert all(t.dtype == torch.float16 for t in tensors.values())
        samples = [source[c] for c in info["captions"]]
        assert info["original_sizes"] == [list(s.original_size) for s in samples]
        assert info["crops_top_left"] == [list(s.crop_top_left) for s in samples]
        batch = image_batch(samples)  # type: ignore[arg-type]
        assert batch.pixels is not None
        expected = encode_pixels(pipe.vae, batch.pixels, torch.device("cpu"))
        torch.testing.assert_close(tensors["latents"].float(), expected, atol=2e-3, rtol=2e-3)
        with torch.no_grad():
            text = encoder.embed(info["captions"])
        assert text.pooled is not None
        torch.testing.assert_close(tensors["prompt_embeds"].float(), text.hidden, atol=2e-3, rtol=0)
        torch.testing.assert_close(
            tensors["pooled_prompt_embeds"].float(), text.pooled, atol=2e-3, rtol=0
        )
        captions += info["captions"]
    assert sorted(captions) == sorted(source)


def test_encode_resumes_and_writes_atomically(
    tiny_models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed while writing a shard leaves no shard file (only its .partial); the rerun
    encodes only the missing shards; a rerun with other settings is refused."""
    torch.set_num_threads(1)
    cfg = encode_config(tiny_models, tmp_path, "sd15")
    out = Path(cfg.out_dir)
    real_save = encode.save_file
    written: list[str] = []

    def dying_save(tensors: dict[str, torch.Tensor], filename: str) -> None:
        if len(written) == 2:  # the third shard: written part-way, then the process dies
            Path(filename).write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real_save(tensors, filename)
        written.append(filename)

    monkeypatch.setattr(encode, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        encode.run(cfg)
    monkeypatch.setattr(encode, "save_file", real_save)
    done = sorted(out.glob("*.safetensors"))
    assert len(done) == 2 and len(list(out.glob("*.partial"))) == 1
    assert not json.loads((out / "meta.json").read_text())["complete"]
    with pytest.raises(ValueError, match="has not finished"):
        TrainingData(DistillConfig(data="encoded", data_path=str(out)), 2, 0, 1, 8)
    before = {p.name: p.stat().st_mtime_ns for p in done}

    counts = encode.run(cfg)
    assert counts["skipped"] == 2 and counts["written"] >= 1 and counts["samples"] == 10
    assert not list(out.glob("*.partial"))
    assert all(p.stat().st_mtime_ns == before[p.name] for p in done)  # not rewritten
    assert json.loads((out / "meta.json").read_text())["complete"]
    assert encode.run(cfg) == {
        "written": 0,
        "skipped": counts["skipped"] + counts["written"],
        "samples": 10,
    }

    with pytest.raises(ValueError, match="other crop"):
        encode.run(replace(cfg, crop="center"))


def test_encoded_shards_split_across_processes(tiny_models: Any, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = encode_config(tiny_models, tmp_path, "sd15")
    encode.run(cfg)
    settings = DistillConfig(data="encoded", data_path=cfg.out_dir, resolution=64, bucket_step=16)
    shares = []
    for rank in (0, 1):
        samples = list(stream_samples(settings, rank, 2, seed=3, epochs=1))
        assert all(isinstance(s, EncodedSample) for s in samples)
        shares.append({s.caption for s in samples})
    assert not shares[0] & shares[1]
    assert len(shares[0] | shares[1]) == 10
    with pytest.raises(ValueError, match="encoded at resolution 64, not 128"):
        TrainingData(replace(settings, resolution=128), 2, 0, 1, 8)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tscd_and_lcm_from_encoded_shards(tiny_models: Any, tmp_path: Path, family: str) -> None:
    """Two steps of TSCD and of LCM read only the shards: latents and text embeddings."""
    torch.set_num_threads(1)
    cfg = encode_config(tiny_models, tmp_path, family, shard_size=4)
    encode.run(cfg)
    train = DistillConfig(
        teacher=cfg.teacher,
        out_dir=str(tmp_path / "run"),
        data="encoded",
        data_path=cfg.out_dir,
        resolution=64,
        batch_size=2,
        stages=(1,),
        steps_per_stage=(2,),
        threads=1,
        device="cpu",
        lora_rank=4,
        lora_alpha=4,
        disc_hidden=8,
        log_every=1,
        sample_count=2,
        sample_every=0,
    )
    data = TrainingData(train, 2, 0, 1, 8)
    batch = next(data.batches(0))
    assert batch.pixels is None and batch.latents is not None and batch.text is not None
    assert (batch.text.pooled is not None) == (family == "sdxl")
    assert batch.micro_conditions.shape == (2, 6)
    assert list(run(train, "tscd")) == [1]
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1] and all("disc/loss" in line for line in lines)
    lcm = replace(train, out_dir=str(tmp_path / "lcm"), target="online")
    assert list(run(lcm, "lcm")) == [1]


def test_feedback_prompts_per_process(tiny_models: Any, tmp_path: Path) -> None:
    """Prompts from a text file, a webdataset's or an encoded folder's captions; each process its
    own, by the global index step x processes + rank."""
    torch.set_num_threads(1)
    cfg = encode_config(tiny_models, tmp_path, "sd15")
    encode.run(cfg)
    vae = load_teacher(cfg.teacher).vae
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(f"prompt {i}" for i in range(7)) + "\n\n")
    captions = sorted(
        c
        for p in Path(cfg.out_dir).glob("*.json")
        if p.name != "meta.json"
        for c in json.loads(p.read_text())["captions"]
    )
    for source in (str(prompts_file), cfg.out_dir, cfg.data_path):
        feedback = EnhanceConfig(prompts=source, batch_size=2, resolution=64)
        cpu = torch.device("cpu")
        one = [next_batch(feedback, step, vae, cpu).captions for step in range(4)]
        two = [
            next_batch(feedback, step, vae, cpu, rank=rank, world=2).captions
            for step in range(2)
            for rank in (0, 1)
        ]
        # two processes' steps 0, 1 cover what one process's steps 0..3 does, no prompt twice
        assert two == one
        expected = 7 if source == str(prompts_file) else 8  # 7 prompts; 10 captions
        assert len({c for batch in one for c in batch}) == expected
        assert next_batch(feedback, 0, vae, cpu).latent_shape == (2, 4, 8, 8)
        if source != str(prompts_file):
            assert {c for batch in one for c in batch} <= set(captions)


def test_encode_shapes_gives_the_streamed_latents(tiny_models: Any, tmp_path: Path) -> None:
    """data=shapes encodes the renders in order, one square bucket, no crop."""
    torch.set_num_threads(1)
    cfg = encode_config(tiny_models, tmp_path, "sd15", data="shapes", train_images=4, shard_size=4)
    encode.run(cfg)
    (shard,) = Path(cfg.out_dir).glob("*.safetensors")
    assert shard.name == "64x64-000000.safetensors"
    info = json.loads(shard.with_suffix(".json").read_text())
    assert info["original_sizes"] == [[64, 64]] * 4 and info["crops_top_left"] == [[0, 0]] * 4
    dataset = ShapesDataset(cfg.seed, 4)
    assert info["captions"] == [s.caption for s in dataset]
    pixels = torch.from_numpy(np.stack([s.rendered.image for s in dataset]))
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    expected = encode_pixels(load_teacher(cfg.teacher).vae, pixels, torch.device("cpu"))
    latents = load_file(str(shard))["latents"].float()
    torch.testing.assert_close(latents, expected, atol=2e-3, rtol=2e-3)
