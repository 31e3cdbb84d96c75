"""Readers of the distillation data sources, one sample at a time (``training.data`` streams them).

Each source is a list of *units* (a folder's image files, webdataset shards, parquet row groups,
encoded shards) read one after another, so that nothing holds more than one unit's sample:

- ``folder``: ``<stem>.png|jpg|jpeg|webp`` + ``<stem>.txt`` pairs in ``data_path``;
- ``webdataset``: ``.tar`` shards (one file or a folder of them) of ``<key>.<ext>`` members, a
  sample's members next to each other (webdataset's layout), read as a stream (``r|``);
- ``parquet``: one ``.parquet`` file or a folder of them, ``image_column`` (encoded image bytes,
  or Hugging Face datasets' ``{bytes, path}`` struct) and ``caption_column``, a row group at a
  time (pyarrow, the ``training`` extra);
- ``encoded``: the shards ``hypersd-train encode`` wrote (``training.encode``).

``share`` splits a source's units between the processes of a launch.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from PIL import Image
from safetensors.torch import load_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ENCODED_META = "meta.json"  # an encoded folder's settings (training.encode)

StreamSource = Literal["folder", "webdataset", "parquet", "encoded"]
Unit = TypeVar("Unit")


@dataclass
class RawSample:
    """An image (its file, or its encoded bytes: decoded only when used) and its caption."""

    source: Path | bytes
    caption: str

    def open(self) -> Image.Image:
        """The image (PIL raises an ``OSError`` for one it cannot read)."""
        return Image.open(self.source if isinstance(self.source, Path) else io.BytesIO(self.source))


@dataclass
class EncodedSample:
    """One sample of an encoded shard: latents ``(C, h, w)``, text embeddings ``(L, D)`` (and
    SDXL's pooled ``(P,)``), caption, original size ``(h, w)`` and crop ``(top, left)``."""

    latents: torch.Tensor
    hidden: torch.Tensor
    pooled: torch.Tensor | None
    caption: str
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def share(units: Sequence[Unit], rank: int, world: int) -> tuple[list[Unit], int]:
    """Process ``rank``'s share of ``units`` (in the same order in every process): every
    ``world``-th unit, or, with fewer units than processes, every unit and a sample stride of
    ``world`` (the caller keeps every ``world``-th sample, from the ``rank``-th). Returns the
    units and the sample stride (1: keep every sample)."""
    if len(units) >= world:
        return list(units[rank::world]), 1
    return list(units), world


def _source_files(path: str | None, source: str, suffix: str) -> list[Path]:
    if path is None:
        raise ValueError(f"data={source} needs data_path=<a {suffix} file or a folder of them>")
    folder = Path(path)
    files = sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else [folder]
    if not files or not files[0].exists():
        raise ValueError(f"no {suffix} files in {folder}")
    return files


# ---------------------------------------------------------------------------------------------
# folder


def folder_units(path: str | None) -> list[Path]:
    """``data=folder``: every ``<stem>.png|jpg|webp`` with a ``<stem>.txt`` caption beside it."""
    if path is None:
        raise ValueError("data=folder needs data_path=<folder of <stem>.png + <stem>.txt>")
    folder = Path(path)
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").exists()
    )
    if not files:
        raise ValueError(f"no <stem>.png|jpg|webp + <stem>.txt pairs in {folder}")
    return files


def read_folder(files: list[Path]) -> Iterator[RawSample]:
    for path in files:
        yield RawSample(path, path.with_suffix(".txt").read_text().strip())


# ---------------------------------------------------------------------------------------------
# webdataset


def webdataset_units(path: str | None) -> list[Path]:
    """``data=webdataset``: a ``.tar`` shard, or a folder's ``*.tar`` shards."""
    if path is None:
        raise ValueError("data=webdataset needs data_path=<a .tar file or a folder of them>")
    folder = Path(path)
    shards = sorted(folder.glob("*.tar")) if folder.is_dir() else [folder]
    if not shards or not shards[0].exists():
        raise ValueError(f"no .tar shards in {folder}")
    return shards


def read_webdataset_captions(shards: list[Path]) -> Iterator[str]:
    """The shards' non-empty ``<key>.txt`` captions, in order; only those members are read (the
    tar is opened for random access, so the images' data is skipped, not read)."""
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                file = tar.extractfile(member) if member.name.endswith(".txt") else None
                caption = "" if file is None else file.read().decode().strip()
                if caption:
                    yield caption


def read_webdataset(shards: list[Path]) -> Iterator[RawSample]:
    """The shards' ``<key>.jpg|png|webp`` + ``<key>.txt`` samples, member by member: a sample is
    yielded as soon as the next key starts (samples without an image or caption are skipped)."""
    for shard in shards:
        key: str | None = None
        members: dict[str, bytes] = {}
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                file = tar.extractfile(member) if member.isfile() else None
                if file is None:
                    continue
                # webdataset's rule: the key is the path up to the first dot of the file name
                folder, _, name = member.name.rpartition("/")
                stem, _, suffix = name.partition(".")
                if f"{folder}/{stem}" != key:
                    yield from _webdataset_sample(members)
                    key, members = f"{folder}/{stem}", {}
                members[f".{suffix.lower()}"] = file.read()
        yield from _webdataset_sample(members)


def _webdataset_sample(members: dict[str, bytes]) -> Iterator[RawSample]:
    image = next((members[s] for s in IMAGE_SUFFIXES if s in members), None)
    if image is not None and ".txt" in members:
        yield RawSample(image, members[".txt"].decode().strip())


# ---------------------------------------------------------------------------------------------
# parquet


def parquet_units(
    path: str | None, image_column: str, caption_column: str
) -> list[tuple[Path, int]]:
    """``data=parquet``: (file, row group) of every file, whose columns are checked here."""
    # imported here: pyarrow is the training extra's, only this source needs it
    import pyarrow as pa
    import pyarrow.parquet as pq

    units = []
    for file in _source_files(path, "parquet", ".parquet"):
        parquet = pq.ParquetFile(file)
        schema = parquet.schema_arrow
        for key, column in (("image_column", image_column), ("caption_column", caption_column)):
            if column not in schema.names:
                raise ValueError(
                    f"{file} has no column {column!r} ({key}); its columns: "
                    + ", ".join(schema.names)
                )
        kind = schema.field(image_column).type
        if not (
            pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)
            or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)
        ):
            raise ValueError(
                f"{file}: image_column {image_column!r} is {kind}, not image bytes "
                "or a struct with a bytes field"
            )
        units += [(file, group) for group in range(parquet.num_row_groups)]
    return units


def read_parquet(
    units: list[tuple[Path, int]], image_column: str, caption_column: str
) -> Iterator[RawSample]:
    """The rows of each (file, row group), skipping rows without image bytes or caption."""
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys([image_column, caption_column]))
    for file, group in units:
        table = pq.ParquetFile(file).read_row_group(group, columns=columns)
        rows = zip(
            table.column(image_column).to_pylist(),
            table.column(caption_column).to_pylist(),
            strict=True,
        )
        for image, caption in rows:
            data = image.get("bytes") if isinstance(image, dict) else image
            if data is not None and caption is not None:
                yield RawSample(data, str(caption).strip())


# ---------------------------------------------------------------------------------------------
# encoded shards (training.encode)


def encoded_meta(path: str | None) -> dict[str, Any]:
    """A finished encoded folder's settings (``meta.json``), checking that it is one."""
    if path is None:
        raise ValueError("data=encoded needs data_path=<a folder written by hypersd-train encode>")
    meta = Path(path) / ENCODED_META
    if not meta.exists():
        raise ValueError(f"{path} has no {ENCODED_META}: not written by hypersd-train encode")
    loaded: dict[str, Any] = json.loads(meta.read_text())
    if not loaded.get("complete"):
        raise ValueError(f"{path}: hypersd-train encode has not finished (rerun it to resume)")
    return loaded


def encoded_units(path: str | None) -> list[Path]:
    """``data=encoded``: the folder's complete shards (``*.safetensors``; ``.partial`` files are
    shards still being written)."""
    encoded_meta(path)
    assert path is not None
    shards = sorted(Path(path).glob("*.safetensors"))
    if not shards:
        raise ValueError(f"no encoded shards in {path}")
    return shards


def read_encoded(shards: list[Path]) -> Iterator[EncodedSample]:
    """The shards' samples, one shard in memory at a time (converted to float32)."""
    for shard in shards:
        tensors = load_file(str(shard))
        info = json.loads(shard.with_suffix(".json").read_text())
        pooled = tensors.get("pooled_prompt_embeds")
        for i, caption in enumerate(info["captions"]):
            yield EncodedSample(
                latents=tensors["latents"][i].float(),
                hidden=tensors["prompt_embeds"][i].float(),
                pooled=None if pooled is None else pooled[i].float(),
                caption=caption,
                original_size=tuple(info["original_sizes"][i]),
                crop_top_left=tuple(info["crops_top_left"][i]),
            )


def encoded_captions(path: str) -> Iterator[str]:
    """The captions of an encoded folder, in shard order (from the JSON sidecars, one at a
    time)."""
    for shard in encoded_units(path):
        yield from json.loads(shard.with_suffix(".json").read_text())["captions"]
