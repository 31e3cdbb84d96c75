"""The generation parameters a PNG carries as text chunks (what made it, readable by any viewer).

`PIL.Image.open(path).text` (or A1111-style tools) reads them back: `prompt`, `negative_prompt`
(when given), `model`, `steps`, `guidance_scale`, `eta` (when used), `seed`, `size` (`WxH`) and
`hypersd_version`; `Software` names the service.
"""

from __future__ import annotations

from hypersd import __version__
from jobs.record import JobRecord


def png_text(record: JobRecord, seed: int) -> dict[str, str]:
    """The text chunks of the image of `record` made with `seed`."""
    text = {
        "prompt": record.prompt,
        "model": record.model,
        "steps": str(record.steps),
        "guidance_scale": f"{record.guidance_scale:g}",
        "seed": str(seed),
        "size": f"{record.width}x{record.height}",
        "hypersd_version": __version__,
        "Software": f"hypersd {__version__}",
    }
    if record.negative_prompt:
        text["negative_prompt"] = record.negative_prompt
    if record.eta is not None:
        text["eta"] = f"{record.eta:g}"
    return text
