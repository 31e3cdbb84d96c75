"""The TensorRT backend, up to the engine build: capability check, fallback, profiles, the builder's
calls (against `fake_tensorrt`, a test double of TensorRT's builder), cache keys and refitting.

TensorRT cannot be installed here (it needs NVIDIA's package index and a CUDA GPU). What runs
here for real: the ONNX exports the engines are built from (parsed and checked by the double),
the optimisation profiles, the timing cache file, the artefact keys, and the refit map, checked
against a real second export: refitting the engine of one LoRA with `refit_weights` of another
gives exactly the other's weights. The engine build itself and the runtime run only where
TensorRT and a GPU are (`test_real_tensorrt_matches_eager`, skipped here with its reason).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import fake_tensorrt
import numpy as np
import pytest
import torch

from hypersd.backends import BackendResult, onnx_export, refit, tensorrt, tensorrt_key
from hypersd.lora import SDPipeline
from hypersd.pipeline import ImageRequest, load
from hypersd.registry import LoraSpec, ModelSpec, Registry, load_registry

if TYPE_CHECKING:
    from tiny_models import TinyModels

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def registry(tiny_models: TinyModels) -> Registry:
    return load_registry(tiny_models.registry)


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import tensorrt` gives the test double."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch, fake_trt: None) -> None:
    """What needs a GPU, faked: its presence and its architecture."""
    monkeypatch.setattr(tensorrt, "require_tensorrt", lambda device: fake_tensorrt)
    monkeypatch.setattr(tensorrt, "gpu_architecture", lambda device: "sm_90")


def with_fields(spec: ModelSpec, **fields: object) -> ModelSpec:
    """`spec` with other fields, validated like a registry entry."""
    return ModelSpec.model_validate(spec.model_dump() | fields)


def with_other_scales(spec: ModelSpec) -> ModelSpec:
    """`spec` with its LoRAs at scale 0.2: other weights, the same base model."""
    return with_fields(spec, loras=[lora.model_dump() | {"scale": 0.2} for lora in spec.loras])


def build_into(spec: ModelSpec, cache: Path) -> BackendResult:
    """`build_artefact` of `spec` (TensorRT) into the artefact cache `cache`."""
    from hypersd.backends import build_artefact

    pipe = load(with_fields(spec, backend="eager"), device="cpu", warmup=False).pipe
    return build_artefact(pipe, spec, cache)


def test_without_tensorrt_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(tensorrt.TensorRTUnavailableError, match="pip install tensorrt") as error:
        tensorrt.import_tensorrt()
    assert "pypi.nvidia.com" in str(error.value) and "CUDA GPU" in str(error.value)
    with pytest.raises(tensorrt.TensorRTUnavailableError, match="runs on CUDA GPUs only"):
        tensorrt.require_tensorrt(torch.device("cpu"))


def test_a_tensorrt_model_falls_back_to_eager_unless_strict(
    registry: Registry, tmp_path: Path
) -> None:
    spec = with_fields(registry.get("sd15-nstep"), backend="tensorrt")
    generator = load(spec, device="cpu", warmup=True, cache_dir=tmp_path)
    assert generator.backend.backend == "eager"
    assert generator.backend.error is not None and "pip install tensorrt" in generator.backend.error
    assert not any(tmp_path.iterdir())  # nothing exported in vain
    image = np.asarray(generator.generate([ImageRequest("a red circle", 0)]).images[0])
    assert image.std() > 5

    with pytest.raises(tensorrt.TensorRTUnavailableError, match="pip install tensorrt"):
        load(with_fields(spec, strict=True), device="cpu", warmup=False, cache_dir=tmp_path)


def test_the_worker_counts_a_tensorrt_fallback(registry: Registry, tmp_path: Path) -> None:
    from prometheus_client import REGISTRY as METRICS
    from serving_fixtures import one_slot_runner

    from jobs.memory_store import MemoryJobStore

    spec = with_fields(registry.get("sd15-nstep"), backend="tensorrt")
    labels = {"model": spec.name, "backend": "tensorrt"}

    def fallbacks() -> float:
        return METRICS.get_sample_value("hypersd_worker_backend_fallbacks_total", labels) or 0.0

    before = fallbacks()
    runner = one_slot_runner(spec, MemoryJobStore(tmp_path / "images", ttl_s=60))
    runner.close()
    assert runner.info().backend == "eager"
    assert fallbacks() == before + 1


def unet_component(registry: Registry, model: str) -> tuple[ModelSpec, onnx_export.Component, int]:
    spec = registry.get(model)
    pipe = load(spec, device="cpu", warmup=False).pipe
    unet = next(part for part in onnx_export.components(pipe) if part.name == onnx_export.UNET)
    return spec, unet, pipe.vae_scale_factor


def test_profiles_cover_the_batch_sizes_and_sizes(registry: Registry) -> None:
    spec, unet, factor = unet_component(registry, "sd15-cfg")  # CFG: the UNet sees 2x the batch
    spec = with_fields(spec, sizes=["64x64", "64x32"], batch_sizes=[1, 4])
    dynamic = tensorrt.profiles(spec, unet, factor)
    assert len(dynamic) == 2  # one per size
    sample = [profile["sample"] for profile in dynamic]
    channels = unet.inputs["sample"].shape[1]
    side, half = 64 // factor, 32 // factor
    assert sample[0].min == (1, channels, side, side) and sample[0].max == (8, channels, side, side)
    assert sample[1].opt == (1, channels, half, side)  # 64 wide, 32 high
    tokens, width = unet.inputs["encoder_hidden_states"].shape[1:]
    assert dynamic[0]["encoder_hidden_states"].max == (8, tokens, width)

    static = tensorrt.profiles(with_fields(spec, static_shapes=True), unet, factor)
    batches = sorted({profile["sample"].opt[0] for profile in static})
    assert batches == [1, 2, 4, 8]  # each batch size, and twice it under CFG
    assert all(rng.min == rng.opt == rng.max for profile in static for rng in profile.values())
    assert len(static) == 4 * 2


def test_build_engine_asks_tensorrt_for_the_registry_profiles_and_precision(
    registry: Registry, tmp_path: Path, fake_trt: None
) -> None:
    spec, unet, factor = unet_component(registry, "sd15-cfg")
    onnx_path = tmp_path / "unet.onnx"
    onnx_export.export_onnx(unet, onnx_path)
    timing_cache = tmp_path / "timing.bin"
    for precision, flags in [("float16", ["FP16", "REFIT"]), ("bfloat16", ["BF16", "REFIT"])]:
        engine = tmp_path / f"unet-{precision}.plan"
        tensorrt.build_engine(
            onnx_path, engine, tensorrt.profiles(spec, unet, factor), precision, timing_cache
        )
        record = json.loads(engine.read_text())
        assert record["flags"] == flags
        assert set(record["inputs"]) == {"sample", "timestep", "encoder_hidden_states"}
        assert record["profiles"][0]["sample"][2][0] == 2 * max(spec.batch_sizes)
    # The second build read what the first wrote into the timing cache; the file holds both.
    assert record["timing_cache_read"] == "timed unet.onnx;"
    assert timing_cache.read_text() == "timed unet.onnx;timed unet.onnx;"
    assert timing_cache.stat().st_mode & 0o777 == 0o644  # readable by workers of other users

    with pytest.raises(ValueError, match="allowed: float16, bfloat16, float32"):
        tensorrt.build_engine(onnx_path, tmp_path / "x.plan", [], "int8", timing_cache)
    # A profile that misses an input fails the build, as it does in TensorRT.
    incomplete = [{"sample": tensorrt.profiles(spec, unet, factor)[0]["sample"]}]
    with pytest.raises(ValueError, match="has no shape in a profile"):
        tensorrt.build_engine(onnx_path, tmp_path / "x.plan", incomplete, "float16", timing_cache)


@pytest.mark.parametrize("model", ["sd15-cfg", "sdxl-1step"])
def test_build_writes_an_engine_per_component_and_the_refit_map(
    registry: Registry, tmp_path: Path, fake_trt: None, model: str
) -> None:
    spec = with_fields(registry.get(model), backend="tensorrt", precision="bfloat16")
    pipe = load(with_fields(spec, backend="eager"), device="cpu", warmup=False).pipe
    parity = tensorrt.build(pipe, spec, tmp_path, tmp_path / "timing.bin")
    names = ["text_encoder", "unet", "vae_decoder"]
    if spec.family == "sdxl":
        names.append("text_encoder_2")
    # The engines' sources are the checked ONNX Runtime exports.
    assert sorted(check.name for check in parity) == sorted(names)
    assert all(check.max_rel < 1e-3 for check in parity), parity
    for name in names:
        record = json.loads((tmp_path / f"{name}{tensorrt.ENGINE_SUFFIX}").read_text())
        assert record["source"] == f"{name}.onnx" and record["flags"] == ["BF16", "REFIT"]
    if spec.family == "sdxl":
        unet = json.loads((tmp_path / "unet.plan").read_text())
        assert {"text_embeds", "time_ids"} <= set(unet["inputs"])
    maps = json.loads((tmp_path / refit.REFIT_MAP_FILE).read_text())
    assert sorted(maps) == sorted(names) and all(maps.values())


def test_the_key_changes_with_tensorrt_version_gpu_precision_and_profiles(
    registry: Registry,
) -> None:
    spec = with_fields(registry.get("sd15-cfg"), backend="tensorrt")
    key = tensorrt_key(spec, "10.3.0", "sm_90")
    assert key == tensorrt_key(spec, "10.3.0", "sm_90")
    others = [
        tensorrt_key(spec, "10.4.0", "sm_90"),
        tensorrt_key(spec, "10.3.0", "sm_89"),
        tensorrt_key(with_fields(spec, precision="bfloat16"), "10.3.0", "sm_90"),
        tensorrt_key(with_fields(spec, batch_sizes=[1, 2]), "10.3.0", "sm_90"),
        tensorrt_key(with_fields(spec, static_shapes=True), "10.3.0", "sm_90"),
        tensorrt_key(with_fields(spec, sizes=["64x64"]), "10.3.0", "sm_90"),
    ]
    assert len({key, *others}) == 1 + len(others)
    # "auto" is float16: the same engine, the same key.
    assert tensorrt_key(with_fields(spec, precision="float16"), "10.3.0", "sm_90") == key


def initializers(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


@pytest.mark.parametrize("component_name", ["unet", "text_encoder"])
def test_refitting_from_the_base_weights_gives_the_other_loras_engine(
    registry: Registry, tmp_path: Path, component_name: str
) -> None:
    """Export with LoRAs A, then compute the refit for LoRAs B from the base + B: every
    initializer of a direct export with B is either refitted to B's value or unchanged."""
    spec_a = registry.get("sd15-cfg")  # two LoRAs at 0.5 and 0.7 (UNet and text encoder)
    loras_b = [
        LoraSpec.model_validate(spec_a.loras[0].model_dump() | {"scale": 1.0}),
        LoraSpec.model_validate(spec_a.loras[1].model_dump() | {"scale": 0.2}),
    ]
    spec_b = with_fields(spec_a, loras=[lora.model_dump() for lora in loras_b])
    exports = {}
    for label, spec in (("a", spec_a), ("b", spec_b)):
        pipe = load(spec, device="cpu", warmup=False).pipe
        component = next(p for p in onnx_export.components(pipe) if p.name == component_name)
        path = tmp_path / f"{label}.onnx"
        onnx_export.export_onnx(component, path)
        exports[label] = (path, component.module.state_dict())
        if label == "a":  # the map comes from the module the engine's export was traced from
            mapping = refit.refit_map(path, component.module)
    weights = refit.refit_weights(mapping, exports["b"][1])

    values_a, values_b = initializers(exports["a"][0]), initializers(exports["b"][0])
    assert values_a.keys() == values_b.keys()  # the same graph: the engine's weight names
    changed = [name for name in values_a if not np.array_equal(values_a[name], values_b[name])]
    assert changed, "the two LoRA sets must differ in this component"
    for name, value_b in values_b.items():
        refitted = weights.get(name, values_a[name])
        np.testing.assert_array_equal(refitted, value_b, err_msg=name)
    print(f"{component_name}: {len(changed)} initializers change, {len(weights)} refitted")


def test_refit_refuses_weights_that_were_shared_and_now_differ() -> None:
    mapping = {"shared": [("first", False), ("second", True)]}
    same = torch.arange(6.0).reshape(2, 3)
    state = {"first": same, "second": same.T.clone()}
    np.testing.assert_array_equal(refit.refit_weights(mapping, state)["shared"], same.numpy())
    state["second"] = state["second"] + 1
    with pytest.raises(ValueError, match="rebuild the engine instead"):
        refit.refit_weights(mapping, state)


def test_real_tensorrt_matches_eager(registry: Registry, tmp_path: Path) -> None:
    pytest.importorskip(
        "tensorrt", reason=f"TensorRT is not installed here ({tensorrt.INSTALL_HINT})"
    )
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU; none here")
    spec = with_fields(registry.get("sd15-cfg"), backend="tensorrt", strict=True)
    eager = load(with_fields(spec, backend="eager"), device="cuda", dtype=torch.float32)
    served = load(spec, device="cuda", cache_dir=tmp_path)
    assert served.backend.backend == "tensorrt"
    requests = [ImageRequest("a red circle", seed) for seed in range(2)]
    images = [
        np.stack([np.asarray(image, np.int16) for image in generator.generate(requests).images])
        for generator in (eager, served)
    ]
    # float16 layers: a few levels of difference, not a different picture
    assert np.abs(images[0] - images[1]).mean() < 3


def test_build_engine_without_tensorrt_says_what_to_install(tmp_path: Path) -> None:
    command = ["build-engine", "--model", "shapes-hyper-1step", "--backend", "tensorrt"]
    command += ["--device", "cpu", "--cache-dir", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "-m", "launcher", *command],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "pip install tensorrt" in result.stderr and "CUDA" in result.stderr
    assert not any(tmp_path.iterdir())


def build_then_refit(
    source: ModelSpec, target: ModelSpec, tmp_path: Path
) -> tuple[Path, Path, SDPipeline]:
    """Engines built for `source` into one folder, refitted for `target` into another; and
    `target`'s eager pipeline (where the refit took its weights)."""
    source_pipe = load(with_fields(source, backend="eager"), device="cpu", warmup=False).pipe
    target_pipe = load(with_fields(target, backend="eager"), device="cpu", warmup=False).pipe
    built, refitted = tmp_path / "built", tmp_path / "refitted"
    built.mkdir()
    refitted.mkdir()
    tensorrt.build(source_pipe, source, built, tmp_path / "timing.bin")
    tensorrt.refit_artefact(built, target_pipe, refitted)
    return built, refitted, target_pipe


def test_a_lora_change_refits_every_engine_from_the_base_weights(
    registry: Registry, tmp_path: Path, fake_trt: None
) -> None:
    import hashlib

    spec_a = with_fields(registry.get("sd15-cfg"), backend="tensorrt")
    built, refitted, pipe_b = build_then_refit(spec_a, with_other_scales(spec_a), tmp_path)

    maps = json.loads((built / refit.REFIT_MAP_FILE).read_text())
    for component in onnx_export.components(pipe_b):
        record = json.loads((refitted / f"{component.name}.plan").read_text())
        expected = refit.refit_weights(maps[component.name], component.module.state_dict())
        # Every mapped weight was written, with B's values (from the base + B, not from A).
        assert record["refitted"] == {
            name: hashlib.sha256(array.tobytes()).hexdigest() for name, array in expected.items()
        }
    assert not any(path.suffix == ".onnx" for path in refitted.iterdir())  # A's weights stay out


def test_the_cache_builds_the_first_engine_and_refits_it_for_other_loras(
    registry: Registry, tmp_path: Path, fake_gpu: None
) -> None:
    spec_a = with_fields(registry.get("sd15-cfg"), backend="tensorrt")
    spec_b = with_other_scales(spec_a)
    first, second, again = (build_into(spec, tmp_path) for spec in (spec_a, spec_b, spec_b))
    assert first.built and first.parity  # exported, checked against eager, engines built
    assert second.built and not second.parity  # refitted: nothing exported
    assert first.artefact != second.artefact
    assert not any(path.suffix == ".onnx" for path in second.artefact.iterdir())  # type: ignore[union-attr]
    unet = json.loads((second.artefact / "unet.plan").read_text())  # type: ignore[operator]
    assert unet["refitted"]  # B's weights written into A's engine
    assert not again.built and again.artefact == second.artefact  # from the cache
    assert sorted(tmp_path.glob("timing-cache-trt*-sm_90.bin"))  # one timing cache per GPU


def test_an_engine_that_cannot_be_refitted_is_built_instead(
    registry: Registry, tmp_path: Path, fake_gpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TensorRT refuses the refit (as it does for weights it cannot change in place)
    monkeypatch.setattr(fake_tensorrt.Refitter, "refit_cuda_engine", lambda self: False)
    spec_a = with_fields(registry.get("sd15-cfg"), backend="tensorrt")
    first, second = (build_into(spec, tmp_path) for spec in (spec_a, with_other_scales(spec_a)))
    assert first.built and second.built and first.artefact != second.artefact
    assert second.parity  # exported and built from B's weights, not refitted from A's engines
    unet = json.loads((second.artefact / "unet.plan").read_text())  # type: ignore[operator]
    assert "refitted" not in unet and unet["profiles"]
    assert (second.artefact / "unet.onnx").is_file()  # type: ignore[operator]


def test_an_entry_with_cfg_gets_other_engines_than_one_without(registry: Registry) -> None:
    # Same weights, no LoRAs, one recipe with CFG (the UNet's batch doubled) and one without:
    # neither may reuse nor refit the other's engines, whose profiles would not take its batches.
    teacher = with_fields(registry.get("sd15-teacher"), backend="tensorrt", name="base")
    no_cfg = with_fields(
        teacher, recipe="nstep-lora", steps=[1, 2, 4], default_steps=2, guidance_scale=0.0
    )
    assert no_cfg.recipe_info.guidance_range[1] <= 1 < teacher.recipe_info.guidance_range[1]
    assert tensorrt_key(teacher, "10.3.0", "sm_90") != tensorrt_key(no_cfg, "10.3.0", "sm_90")


@pytest.mark.parametrize("static", [False, True])
def test_any_batch_runs_within_the_engine_profiles(registry: Registry, static: bool) -> None:
    from hypersd.backends import tensorrt_runtime

    # CFG doubles the UNet batch; batch_sizes (1, 4, 8) static: profiles at 1, 2, 4, 8 and 16 only.
    spec, unet, factor = unet_component(registry, "sd15-cfg")
    spec = with_fields(spec, static_shapes=static)
    profiles = [
        {name: (shapes.min, shapes.opt, shapes.max) for name, shapes in profile.items()}
        for profile in tensorrt.profiles(spec, unet, factor)
    ]
    batches_run = []

    def engine(inputs: dict[str, torch.Tensor], output_shapes: dict) -> list[torch.Tensor]:
        shapes = {name: tuple(tensor.shape) for name, tensor in inputs.items()}
        assert tensorrt_runtime.profile_index(profiles, shapes) is not None, shapes
        batches_run.append(shapes["sample"][0])
        noise_pred = inputs["sample"] * inputs["timestep"][:, None, None, None]
        assert noise_pred.shape == output_shapes["noise_pred"]
        return [noise_pred]

    for images in range(1, 2 * max(spec.batch_sizes) + 2):
        batch = 2 * images
        inputs = {
            name: torch.randn(batch, *example.shape[1:]) for name, example in unet.inputs.items()
        }
        shapes = {name: tuple(tensor.shape) for name, tensor in inputs.items()}
        ranges = tensorrt_runtime.batch_ranges(profiles, shapes)
        batches_run.clear()
        (noise_pred,) = tensorrt_runtime.run_in_profile_batches(
            engine, inputs, {"noise_pred": tuple(inputs["sample"].shape)}, ranges
        )
        # every sample's own result, none lost or mixed with the padding
        expected = inputs["sample"] * inputs["timestep"][:, None, None, None]
        torch.testing.assert_close(noise_pred, expected)
        assert sum(batches_run) >= batch and max(batches_run) <= 2 * max(spec.batch_sizes)
        if static:
            assert set(batches_run) <= {1, 2, 4, 8, 16}
        else:
            assert batches_run == [16] * (batch // 16) + [batch % 16] * (batch % 16 > 0)

    with pytest.raises(ValueError, match="no optimisation profile"):
        tensorrt_runtime.batch_chunks(2, [])


def test_builds_at_once_keep_each_others_timing_cache_entries(
    registry: Registry, tmp_path: Path, fake_trt: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, unet, factor = unet_component(registry, "sd15-cfg")
    onnx_path = tmp_path / "unet.onnx"
    onnx_export.export_onnx(unet, onnx_path)
    timing_cache = tmp_path / "timing.bin"
    build = fake_tensorrt.Builder.build_serialized_network

    def while_another_build_finishes(self: object, network: object, config: object) -> bytes:
        # another model's build on this GPU writes the file after this one read it
        timing_cache.write_bytes(b"timed vae_decoder.onnx;")
        return build(self, network, config)  # type: ignore[arg-type]

    monkeypatch.setattr(
        fake_tensorrt.Builder, "build_serialized_network", while_another_build_finishes
    )
    profiles = tensorrt.profiles(spec, unet, factor)
    tensorrt.build_engine(onnx_path, tmp_path / "unet.plan", profiles, "float16", timing_cache)
    entries = set(timing_cache.read_text().split(";")) - {""}
    assert entries == {"timed vae_decoder.onnx", "timed unet.onnx"}


@pytest.mark.parametrize("direction", ["loras to none", "none to loras"])
def test_refits_between_an_entry_with_loras_and_one_without(
    registry: Registry, tmp_path: Path, fake_trt: None, direction: str
) -> None:
    import hashlib

    # Fused LoRA layers keep the base weight as `<layer>.base_layer.weight`: the names differ
    # from the plain model's, and each must still find the other's weights.
    with_loras = with_fields(registry.get("sd15-cfg"), backend="tensorrt")
    without = with_fields(with_loras, loras=[])
    source, target = (
        (with_loras, without) if direction == "loras to none" else (without, with_loras)
    )
    built, refitted, target_pipe = build_then_refit(source, target, tmp_path)

    # what the target model's own export holds, by value: the refit wrote exactly that
    maps = json.loads((built / refit.REFIT_MAP_FILE).read_text())
    exported = tmp_path / "target-unet.onnx"
    unet = next(p for p in onnx_export.components(target_pipe) if p.name == onnx_export.UNET)
    onnx_export.export_onnx(unet, exported)
    target_values = {
        name: hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
        for name, array in refit.refit_weights(
            refit.refit_map(exported, unet.module), unet.module.state_dict()
        ).items()
    }
    record = json.loads((refitted / "unet.plan").read_text())
    assert len(record["refitted"]) == len(maps["unet"]) > 0
    # each initializer got the target's parameter the source export's map names for it ...
    named = refit.refit_weights(maps["unet"], unet.module.state_dict())
    assert record["refitted"] == {
        name: hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
        for name, array in named.items()
    }
    # ... and those are values the target's own export holds (none of the source's LoRAs)
    assert set(record["refitted"].values()) <= set(target_values.values())
