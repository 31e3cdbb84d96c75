"""Feedback and DMD prompts streamed from a webdataset (``.txt`` captions) or from the shards
``hypersd-train encode`` wrote (their captions): ``training.data.PromptCycle`` reads them in order
and cycles; both stages run two optimisation steps on tiny SD1.5 / SDXL models from each."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from test_training_encode import encode_config
from test_training_enhance import log_lines, tiny_config
from tiny_models import tiny_image_captions, write_webdataset

from training import encode, enhance_loop
from training.data import PromptCycle
from training.enhance import run


def source_captions(source: Path) -> list[str]:
    """The captions of an encoded folder (JSON sidecars) or a webdataset, read independently."""
    if (source / "meta.json").exists():
        sidecars = sorted(p for p in source.glob("*.json") if p.name != "meta.json")
        return [c for p in sidecars for c in json.loads(p.read_text())["captions"]]
    captions = []
    for shard in sorted(source.glob("*.tar")):
        with tarfile.open(shard) as tar:
            captions += [
                tar.extractfile(m).read().decode()  # type: ignore[union-attr]
                for m in tar.getmembers()
                if m.name.endswith(".txt")
            ]
    return captions


def test_prompt_cycle_streams_webdataset_captions(tmp_path: Path) -> None:
    """A folder of shards or a single .tar: its captions in order, cycled; blank ones and
    non-caption members skipped; asking an earlier index starts the reading again."""
    samples = tiny_image_captions(5)
    folder = write_webdataset(tmp_path / "wds", samples, shards=2)
    captions = [caption for _, caption in samples]
    assert source_captions(folder) == captions
    cycle = PromptCycle(str(folder))
    assert [cycle[i] for i in range(12)] == [captions[i % 5] for i in range(12)]
    assert cycle.total == 5
    assert [cycle[i] for i in (3, 1, 7)] == [captions[3], captions[1], captions[2]]
    single = PromptCycle(str(folder / "shard-001.tar"))  # samples 3 and 4
    assert [single[i] for i in range(4)] == [captions[3], captions[4]] * 2
    # a shard whose only caption is blank, beside an image: no prompts
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as tar:
        for name, data in (("a.png", b"not read"), ("a.txt", b" \n")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ValueError, match="no prompts"):
        PromptCycle(str(empty))[0]
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(ValueError, match=r"no \.tar shards"):
        PromptCycle(str(tmp_path / "empty-folder"))
    with pytest.raises(ValueError, match="no such file or folder"):
        PromptCycle(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("source", ["webdataset", "encoded"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_feedback_and_dmd_on_streamed_prompts(
    tiny_models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: str, source: str
) -> None:
    """Two steps of each stage with prompts from the source: each step the next two captions."""
    torch.set_num_threads(1)
    encoding = encode_config(tiny_models, tmp_path, family)  # writes the webdataset (10 samples)
    prompts = Path(encoding.data_path or "")
    if source == "encoded":
        encode.run(encoding)
        prompts = Path(encoding.out_dir)
    captions = source_captions(prompts)
    assert len(captions) == 10
    drawn: list[list[str]] = []
    next_batch = enhance_loop.next_batch

    def recording(*args: Any, **kwargs: Any) -> Any:
        batch = next_batch(*args, **kwargs)
        drawn.append(batch.captions)
        return batch

    monkeypatch.setattr(enhance_loop, "next_batch", recording)
    base = getattr(tiny_models, family)
    # the Shapes judge reads Shapes captions only (these are numbered): the aesthetic reward
    settings = {"prompts": str(prompts), "alignment": "none"}
    feedback = tiny_config(base, tmp_path / "feedback", **settings)
    assert run(feedback, "feedback") is not None
    dmd = tiny_config(
        base, tmp_path / "dmd", **settings, aesthetic="none", structure_weight=0.0, fake_updates=1
    )
    assert run(dmd, "dmd") is not None
    for stage in ("feedback", "dmd"):
        assert [line["step"] for line in log_lines(tmp_path / stage)] == [0, 1]
    assert "student/dmd" in log_lines(tmp_path / "dmd")[0]
    # each stage: steps 0 and 1 took the source's first four captions, in order
    assert drawn == [captions[0:2], captions[2:4]] * 2
