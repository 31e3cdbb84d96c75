"""The gateway's view of the workers in its metrics, through a real gateway + worker + Redis."""

from __future__ import annotations

import httpx
from serving_fixtures import MODEL, Stack


def test_live_workers_are_counted_by_model_and_backend(stack: Stack) -> None:
    text = httpx.get(f"{stack.server.url}/metrics").text
    # the session's one worker serves MODEL with the registry's backend, ONNX Runtime (a worker
    # whose backend failed to load would count under "eager")
    assert f'hypersd_workers{{backend="onnxruntime",model="{MODEL}"}} 1.0' in text
    # no other model has a live worker, so none appears
    assert text.count("hypersd_workers{") == 1
