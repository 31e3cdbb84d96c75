"""Backends: ONNX export parity, whole-pipeline images against eager, the artefact cache, fallback.

Each export is checked against eager on the same inputs when it is built (`BackendResult.parity`,
bounded here), and the ONNX Runtime pipeline's images are compared with eager's for the same
prompts and seeds, over the tiny SD1.5 and SDXL models with their LoRAs fused and the shipped
Shapes 1-step model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from hypersd import pipeline
from hypersd.backends import cache, onnxruntime_key
from hypersd.pipeline import BatchResult, Generator, ImageRequest, load, load_pipeline
from hypersd.registry import LoraSpec, ModelSpec, Registry, load_registry

if TYPE_CHECKING:
    from tiny_models import TinyModels

pytest.importorskip("onnxruntime")

SHIPPED = load_registry(Path(__file__).resolve().parents[1] / "models" / "registry.toml")
REQUESTS = [
    ImageRequest("a large red circle in the center on a white background", 1),
    ImageRequest("a small blue triangle to the left of a large yellow square", 2, "gray"),
]
# Exports agree with eager to float32 rounding. Images: the random tiny models at CFG 5-6 amplify
# that rounding to a few 8-bit levels at a few pixels (the shipped Shapes model: at most one).
MAX_REL_ERROR = 1e-3
MAX_PIXEL_DIFFERENCE = 8
MEAN_PIXEL_DIFFERENCE = 0.5


@pytest.fixture(scope="module")
def registry(tiny_models: TinyModels) -> Registry:
    return load_registry(tiny_models.registry)


def with_backend(spec: ModelSpec, backend: str = "onnxruntime", **fields: object) -> ModelSpec:
    """`spec` with another backend (and other fields), validated like a registry entry."""
    return ModelSpec.model_validate(spec.model_dump() | {"backend": backend} | fields)


def pixels(result: BatchResult) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in result.images])


def assert_like_eager(eager: Generator, compiled: Generator, **kwargs: object) -> None:
    """Same requests and seeds through both: images within the pixel tolerances above."""
    requests = REQUESTS
    if compiled.spec.guidance_scale <= 1:  # no CFG: no negative prompts
        requests = [ImageRequest(request.prompt, request.seed) for request in REQUESTS]
    expected = pixels(eager.generate(requests, **kwargs))  # type: ignore[arg-type]
    actual = pixels(compiled.generate(requests, **kwargs))  # type: ignore[arg-type]
    difference = np.abs(expected - actual)
    print(
        f"{compiled.spec.name}: pixel difference max {difference.max()}, "
        f"mean {difference.mean():.4f} (of 255)"
    )
    assert difference.max() <= MAX_PIXEL_DIFFERENCE
    assert difference.mean() <= MEAN_PIXEL_DIFFERENCE
    assert expected.std() > 5  # real pictures are compared, not flat fields


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [
        ("sd15-cfg", {}),  # two LoRAs fused at scales 0.5 and 0.7, CFG and negative prompts
        ("sd15-nstep", {"width": 64, "height": 32, "steps": 1}),  # the second size, same export
        ("sdxl-cfg", {}),  # kohya LoRA over the UNet and both text encoders, CFG
        ("sdxl-1step", {}),  # a UNet override; SDXL's text_embeds and time_ids
    ],
)
def test_onnxruntime_matches_eager(
    registry: Registry, tmp_path: Path, model: str, kwargs: dict[str, int]
) -> None:
    spec = registry.get(model)
    eager = load(spec, device="cpu", warmup=False)
    compiled = load(with_backend(spec, strict=True), device="cpu", warmup=False, cache_dir=tmp_path)
    assert compiled.backend.backend == "onnxruntime" and compiled.backend.built
    names = {parity.name for parity in compiled.backend.parity}
    sdxl = spec.family == "sdxl"
    assert names == {"text_encoder", "unet", "vae_decoder"} | (
        {"text_encoder_2"} if sdxl else set()
    )
    for parity in compiled.backend.parity:
        print(parity)
        assert parity.max_rel < MAX_REL_ERROR, parity
    assert_like_eager(eager, compiled, **kwargs)


SHAPES_CAPTIONS = [
    "a large red circle in the center on a white background",
    "a small blue triangle to the left of a large yellow square on a black background",
    "a large green cross above a small purple circle on a gray background",
    "a small orange square in the center on a black background",
]


def test_shapes_1step_with_its_loras_matches_eager_and_the_judge_accepts_it(
    tmp_path: Path,
) -> None:
    from training.attributes import load_attribute_net
    from training.image_ops import images_to_tensor

    torch.set_num_threads(1)
    spec = SHIPPED.get("shapes-hyper-1step")
    eager = load(with_backend(spec, "eager"), device="cpu", warmup=False)
    compiled = load(with_backend(spec, strict=True), device="cpu", warmup=False, cache_dir=tmp_path)
    for parity in compiled.backend.parity:
        print(parity)
        assert parity.max_rel < MAX_REL_ERROR, parity
    assert_like_eager(eager, compiled)

    # A served image through the ONNX Runtime backend, judged by the Shapes attribute network:
    # the same verdicts as eager's images, and these captions drawn right.
    requests = [ImageRequest(caption, seed) for seed, caption in enumerate(SHAPES_CAPTIONS)]
    judge = load_attribute_net()
    verdicts = [
        judge.is_correct(images_to_tensor(generator.generate(requests).images), SHAPES_CAPTIONS)
        for generator in (eager, compiled)
    ]
    print("judged correct (eager, onnxruntime):", [v.tolist() for v in verdicts])
    assert verdicts[0].equal(verdicts[1])
    assert verdicts[1].sum() >= 3


def test_a_second_load_uses_the_cached_artefact(registry: Registry, tmp_path: Path) -> None:
    spec = with_backend(registry.get("sd15-nstep"), strict=True)
    first = load(spec, device="cpu", warmup=False, cache_dir=tmp_path)
    second = load(spec, device="cpu", warmup=False, cache_dir=tmp_path)
    assert first.backend.built and not second.backend.built
    assert first.backend.artefact == second.backend.artefact
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == [
        first.backend.artefact.name  # type: ignore[union-attr]
    ]
    np.testing.assert_array_equal(
        pixels(first.generate(REQUESTS[:1])), pixels(second.generate(REQUESTS[:1]))
    )


def test_cache_keys_change_with_every_input_and_only_then(
    registry: Registry, tiny_models: TinyModels
) -> None:
    spec = with_backend(registry.get("sd15-cfg"))
    base_hash = cache.weights_hash(spec)

    def key(spec: ModelSpec = spec, **changes: str) -> str:
        arguments = {
            "backend": "onnxruntime",
            "precision": "float32",
            "device": "cpu",
            "versions": {"onnxruntime": "1.32.0"},
        }
        return cache.artefact_key(spec, base_hash=base_hash, **(arguments | changes))  # type: ignore[arg-type]

    lora, style = spec.loras
    other_scale = with_backend(spec, loras=[lora, style.model_copy(update={"scale": 0.8})])
    other_lora = with_backend(
        spec, loras=[lora, LoraSpec(name="style", path=tiny_models.sd15_kohya, scale=0.7)]
    )
    other_sizes = with_backend(spec, sizes=["64x64"], default_size="64x64")
    variants = [
        key(other_scale),
        key(other_lora),
        key(other_sizes),
        key(backend="tensorrt"),
        key(precision="float16"),
        key(device="cuda"),
        key(versions={"onnxruntime": "1.33.0"}),
    ]
    assert key() == key()
    cpu, float32 = torch.device("cpu"), torch.float32
    assert onnxruntime_key(spec, cpu, float32) == onnxruntime_key(spec, cpu, float32)
    assert len({key(), *variants}) == len(variants) + 1
    # other base weights: the SDXL folder in place of the SD1.5 one
    other_base = with_backend(spec, family="sdxl", path=str(tiny_models.sdxl))
    assert cache.weights_hash(other_base) != base_hash


BUILDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hypersd.backends.cache import get_or_build

    def build(folder):
        # A slow, many-part write: a reader of a half-built artefact would see part of it.
        for part in range(20):
            (folder / f"part-{part}").write_bytes(bytes([part]) * 100_000)
            time.sleep(0.02)
        with open(sys.argv[2], "a") as log:
            log.write("built\\n")

    folder, built = get_or_build(Path(sys.argv[1]), "key", build)
    parts = sorted(folder.glob("part-*"))
    assert len(parts) == 20 and all(p.stat().st_size == 100_000 for p in parts), parts
    print(built)
    """
)


def test_two_processes_building_one_key_build_it_once(tmp_path: Path) -> None:
    log = tmp_path / "log"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", BUILDER, str(tmp_path / "cache"), str(log)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = sorted(process.communicate(timeout=60)[0].strip() for process in processes)
    assert [process.returncode for process in processes] == [0, 0]
    assert outputs == ["False", "True"]  # one built it, the other read the finished artefact
    assert log.read_text() == "built\n"
    # nothing half-written is left behind: the artefact, and the lock file
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == ["key", "key.lock"]


def test_a_failed_build_leaves_nothing_in_the_cache(tmp_path: Path) -> None:
    def build(folder: Path) -> None:
        (folder / "part").write_text("half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        cache.get_or_build(tmp_path, "key", build)
    assert [path.name for path in tmp_path.iterdir()] == ["key.lock"]


def test_an_export_that_does_not_match_eager_is_not_cached_or_served(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hypersd.backends import onnx_export

    eager_outputs = onnx_export.eager_outputs

    def off_by_a_tenth(component: onnx_export.Component, inputs: dict) -> object:
        outputs = eager_outputs(component, inputs)
        if component.name != onnx_export.UNET:
            return outputs
        return outputs * 1.1  # as if the UNet's export were 10% off

    monkeypatch.setattr(onnx_export, "eager_outputs", off_by_a_tenth)
    spec = with_backend(registry.get("sd15-nstep"))
    generator = load(spec, device="cpu", warmup=False, cache_dir=tmp_path)
    assert generator.backend.backend == "eager"
    assert "ExportMismatchError" in str(generator.backend.error)
    assert "unet: max abs error" in str(generator.backend.error)
    assert [path.name for path in tmp_path.iterdir()] == [
        f"{onnxruntime_key(spec, torch.device('cpu'), torch.float32)}.lock"
    ]
    with pytest.raises(onnx_export.ExportMismatchError):
        load(with_backend(spec, strict=True), device="cpu", warmup=False, cache_dir=tmp_path)


def test_eager_reference_runs_in_true_float32() -> None:
    from hypersd.backends import onnx_export

    # on CUDA, cuDNN's float32 convolutions default to TF32, whose error would fail the export
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return x

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.allow_tf32 = True
    try:
        inputs = {"x": torch.ones(1)}
        probe = onnx_export.Component("probe", Probe(), inputs, ("y",), {})
        onnx_export.eager_outputs(probe, inputs)
        assert seen == [(False, False)]
        assert torch.backends.cudnn.allow_tf32  # as it was after the call
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_a_killed_builder_leaves_no_staging_folder_behind(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    builder = subprocess.Popen([sys.executable, "-c", BUILDER, str(root), str(tmp_path / "log")])
    try:
        deadline = time.monotonic() + 60
        while not list(root.glob(".key.*/part-3")):  # killed mid-build, as by the OOM killer
            assert builder.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        builder.send_signal(signal.SIGKILL)
        builder.wait()
    assert list(root.glob(".key.*"))  # what the killed builder left
    # On a volume shared between hosts, another host's build may be in progress (its lock may
    # not reach here): its folder stays unless untouched for a day.
    building, abandoned = root / ".key.other-host.abc123", root / ".key.other-host.def456"
    building.mkdir()
    abandoned.mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(abandoned, (two_days_ago, two_days_ago))

    folder, built = cache.get_or_build(root, "key", lambda folder: (folder / "x").write_text(""))
    assert built and (folder / "x").is_file()
    assert sorted(path.name for path in root.iterdir()) == [building.name, "key", "key.lock"]


def test_a_backend_that_fails_falls_back_to_eager_unless_strict(
    registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A cache "folder" that is a file: the artefact cannot be written, as on a read-only volume.
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    spec = with_backend(registry.get("sd15-nstep"))
    generator = load(spec, device="cpu", warmup=False, cache_dir=not_a_folder)
    assert generator.backend.backend == "eager"
    assert generator.backend.error is not None and "FileExistsError" in generator.backend.error
    assert "backend onnxruntime failed" in caplog.text and "running eager instead" in caplog.text
    assert len(generator.generate(REQUESTS[:1]).images) == 1  # and it serves, eagerly

    with pytest.raises(FileExistsError):
        load(with_backend(spec, strict=True), device="cpu", warmup=False, cache_dir=not_a_folder)


def test_the_registry_names_the_allowed_backends(tiny_models: TinyModels, tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(
        f'default = "x"\n[models.x]\nfamily = "sd15"\npath = "{tiny_models.sd15}"\n'
        'recipe = "teacher"\nbackend = "onnxruntime"\nstrict = true\n'
        '[models.y]\nextends = "x"\nrecipe = "teacher"\n'
    )
    registry = load_registry(path)
    assert (registry.get("y").backend, registry.get("y").strict) == ("onnxruntime", True)
    path.write_text(path.read_text().replace('"onnxruntime"', '"tensorrt"'))
    assert load_registry(path).get("y").backend == "tensorrt"
    path.write_text(path.read_text().replace('"tensorrt"', '"trt"'))
    with pytest.raises(ValueError, match="'eager', 'onnxruntime', 'compile' or 'tensorrt'"):
        load_registry(path)


def test_the_worker_reports_the_backend_in_use(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client import REGISTRY as METRICS
    from serving_fixtures import one_slot_runner

    from jobs.memory_store import MemoryJobStore

    spec = with_backend(registry.get("sd15-nstep"))
    store = MemoryJobStore(tmp_path / "images", ttl_s=60)

    def runner_backend() -> str:
        runner = one_slot_runner(spec, store)
        runner.close()
        return runner.info().backend

    def fallbacks() -> float | None:
        labels = {"model": spec.name, "backend": "onnxruntime"}
        return METRICS.get_sample_value("hypersd_worker_backend_fallbacks_total", labels)

    def in_use() -> dict[str, float | None]:
        return {
            backend: METRICS.get_sample_value(
                "hypersd_worker_backend", {"model": spec.name, "backend": backend}
            )
            for backend in ("eager", "onnxruntime")
        }

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    assert runner_backend() == "onnxruntime"
    assert in_use() == {"eager": 0, "onnxruntime": 1}
    before = fallbacks()
    assert before is not None  # the series exists before a fallback: increase() sees its step

    (tmp_path / "file").write_text("")
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "file"))  # unwritable: falls back
    assert runner_backend() == "eager"
    assert in_use() == {"eager": 1, "onnxruntime": 0}  # the backend no longer in use reads 0
    assert fallbacks() == before + 1


def test_build_engine_builds_the_artefact_once(tmp_path: Path) -> None:
    def build_engine() -> subprocess.CompletedProcess[str]:
        command = ["build-engine", "--model", "shapes-hyper-1step", "--backend", "onnxruntime"]
        return subprocess.run(
            [sys.executable, "-m", "launcher", *command, "--cache-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=300,
            check=False,
        )

    first = build_engine()
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["text_encoder", "unet", "vae_decoder"]
    assert all("max abs error" in line and "max rel error" in line for line in lines[:3])
    folder = Path(lines[3].split(" (")[0])
    assert lines[3].endswith("(built)") and folder.parent == tmp_path
    expected = {"key.json", "text_encoder.onnx", "unet.onnx", "vae_decoder.onnx"}
    assert {path.name for path in folder.iterdir()} == expected

    second = build_engine()
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == f"{folder} (already in the cache)"


def test_build_engine_refuses_a_backend_without_artefacts_before_loading(
    tiny_models: TinyModels,
) -> None:
    command = ["--registry", str(tiny_models.registry), "build-engine", "--model", "sd15-teacher"]
    result = subprocess.run(
        [sys.executable, "-m", "launcher", *command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "runs on backend 'eager', which builds no artefact" in result.stderr
    assert "--backend (onnxruntime or tensorrt)" in result.stderr


def test_a_backend_that_fails_outside_its_loading_thread_falls_back_at_load(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from hypersd.backends import ort

    loading_thread = threading.current_thread()
    call = ort.Session.__call__

    def only_on_the_loading_thread(self: ort.Session, *args: object) -> object:
        # as torch.compile's CUDA graphs in torch before pytorch#184357 (the worker's batcher
        # thread runs every batch)
        if threading.current_thread() is not loading_thread:
            raise AssertionError("torch._C._is_key_in_tls('tree_manager_containers')")
        return call(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ort.Session, "__call__", only_on_the_loading_thread)
    spec = with_backend(registry.get("sd15-nstep"))
    generator = load(spec, device="cpu", warmup=True, cache_dir=tmp_path)
    assert generator.backend.backend == "eager"
    assert "_is_key_in_tls" in str(generator.backend.error)
    with pytest.raises(AssertionError, match="_is_key_in_tls"):
        load(with_backend(spec, strict=True), device="cpu", warmup=True, cache_dir=tmp_path)


def test_static_compiled_batches_run_padded_to_the_listed_sizes(registry: Registry) -> None:
    from hypersd.backends import BackendResult

    # The padding is the Generator's, whatever runs the modules: eager ones, labelled compile,
    # show it without minutes of compiling.
    eager = load(registry.get("sd15-nstep"), device="cpu", warmup=False)
    spec = with_backend(eager.spec, "compile", static_shapes=True, batch_sizes=[1, 4])
    padded = Generator(spec, eager.pipe, BackendResult("compile"))
    batches: list[int] = []
    hook = eager.pipe.unet.register_forward_hook(
        lambda module, args, output: batches.append(args[0].shape[0])
    )
    try:
        requests = [ImageRequest("a red circle", seed) for seed in (5, 6, 7)]
        result = padded.generate(requests, steps=1)
        assert batches == [4]  # 3 images ran as the listed 4
        assert result.seeds == [5, 6, 7] and len(result.images) == 3
        batches.clear()
        padded.warmup()
        assert batches == [1, 4]  # every listed batch compiled at load
        batches.clear()
        padded.generate([ImageRequest("a red circle", seed) for seed in range(5)], steps=1)
        assert batches == [5]  # above the largest listed: as it is
    finally:
        hook.remove()
    # each image as alone, up to the rounding a batch's summation order gives (as in
    # test_pipeline.py): the padding does not change its batch mates
    for request, image in zip(requests, result.images, strict=True):
        alone = pixels(eager.generate([request], steps=1))[0]
        assert np.abs(alone - np.asarray(image, dtype=np.int16)).max() <= 2
    assert eager.padded_batch(3) == 3  # eager never pads


def test_load_compiles_every_padded_batch_size(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hypersd.backends import compiled

    # torch.compile left out (minutes on a CPU): load's check runs the eager modules as compiled
    monkeypatch.setattr(compiled, "install", lambda pipe, static_shapes: None)
    batches: list[int] = []
    spec = with_backend(
        registry.get("sd15-nstep"), "compile", static_shapes=True, batch_sizes=[1, 3]
    )
    original = load_pipeline

    def recording(spec: ModelSpec, dtype: torch.dtype) -> object:
        pipe = original(spec, dtype)
        pipe.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
        return pipe

    monkeypatch.setattr(pipeline, "load_pipeline", recording)
    generator = load(spec, device="cpu", warmup=True)
    assert generator.backend.backend == "compile"
    # each listed batch, from the loading thread and again from a second one
    assert batches == [1, 3, 1, 3]


def test_a_failing_first_call_puts_the_eager_modules_back(
    registry: Registry, tmp_path: Path
) -> None:
    from hypersd.backends import install_backend

    generator = load(registry.get("sd15-nstep"), device="cpu", warmup=False)
    pipe = generator.pipe
    modules = (pipe.text_encoder, pipe.unet, pipe.vae, pipe.vae.decoder)

    def first_call() -> None:
        assert type(pipe.unet).__name__ == "ExportedUNet"  # the swap happened before the call
        raise RuntimeError("no kernel for this shape")

    result = install_backend(pipe, with_backend(generator.spec), tmp_path, check=first_call)
    assert result.backend == "eager" and "no kernel for this shape" in str(result.error)
    assert (pipe.text_encoder, pipe.unet, pipe.vae, pipe.vae.decoder) == modules
    assert len(generator.generate(REQUESTS[:1]).images) == 1


@pytest.mark.skipif(
    os.environ.get("HYPERSD_COMPILE_TESTS") != "1",
    reason="torch.compile of even the tiny pipeline takes about 5 minutes on a shared 2-core CPU "
    "(318 s measured), too long for CI; HYPERSD_COMPILE_TESTS=1 runs it",
)
def test_compile_matches_eager(registry: Registry) -> None:
    # One shape (the warm-up's: batch 1, 64x64, 1 step); compiling it on a CPU is the slow part.
    spec = registry.get("sd15-nstep")
    eager = load(spec, device="cpu", warmup=False)
    compiled = load(with_backend(spec, "compile", strict=True), device="cpu", warmup=True)
    assert compiled.backend.backend == "compile"
    request = [ImageRequest(REQUESTS[0].prompt, REQUESTS[0].seed)]
    expected = pixels(eager.generate(request, steps=1))
    actual = pixels(compiled.generate(request, steps=1))
    difference = np.abs(expected - actual)
    print(f"compile: pixel difference max {difference.max()}, mean {difference.mean():.4f}")
    assert difference.max() <= MAX_PIXEL_DIFFERENCE
    assert difference.mean() <= MEAN_PIXEL_DIFFERENCE
