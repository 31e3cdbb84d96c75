"""Where the gateway and the worker meet: the `hypersd` command and embedded mode.

The gateway (`service`) and the worker (`worker`) never import each other; this package composes
them: `hypersd serve` runs the gateway alone on Redis, or, without `REDIS_URL`, the gateway with
the worker's job runner in the same process (`launcher.embedded`).
"""
