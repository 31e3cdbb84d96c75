"""The small Shapes networks (attribute, aesthetic, segmentation): how they are saved and loaded.

Each lives in a folder of ``model.safetensors`` (weights, no pickle) and
``config.json`` (what it is, its architecture, how it was trained and what it
measured), and loads in eval mode with frozen parameters: they judge and reward
images, they are never trained further by the code that loads them.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from training.config import config_to_dict, load_config
from training.schedule import lr_factor

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
NetT = TypeVar("NetT", bound=torch.nn.Module)


class SavedConfig(Protocol):
    """A small network's training config: it names the folder the network is saved to."""

    @property
    def out(self) -> str: ...


ConfigT = TypeVar("ConfigT", bound=SavedConfig)


def save_network(net: torch.nn.Module, directory: str | Path, config: dict[str, Any]) -> Path:
    """Write the weights and ``config`` (which should name its ``model_type``) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_config(directory: str | Path, model_type: str | None = None) -> dict[str, Any]:
    """The saved ``config.json``; ``ValueError`` when it is not a ``model_type`` network."""
    config: dict[str, Any] = json.loads((Path(directory) / CONFIG_NAME).read_text())
    if model_type is not None and config.get("model_type") != model_type:
        raise ValueError(f"{directory}: not a {model_type} (found {config.get('model_type')!r})")
    return config


def load_weights(
    net: NetT, directory: str | Path, device: torch.device | str | None = None
) -> NetT:
    """Fill ``net`` from ``model.safetensors``; return it on ``device``, in eval mode, frozen."""
    net.load_state_dict(load_file(str(Path(directory) / WEIGHTS_NAME), device="cpu"))
    net.to(device or "cpu")
    return net.eval().requires_grad_(False)


def train_command(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    config_type: type[ConfigT],
    train: Callable[[ConfigT], tuple[NetT, dict[str, Any]]],
    save: Callable[[NetT, str | Path, dict[str, Any]], Path],
    format_metrics: Callable[[dict[str, Any]], str],
) -> int:
    """``hypersd-train <network> [--config FILE] [key=value ...]`` for a small Shapes network:
    build the config, train, save the network with its config and metrics, print the metrics.

    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML file over the defaults")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args, unknown = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    config = load_config(config_type, args.config, [*args.overrides, *unknown])
    net, metrics = train(config)
    out = save(net, config.out, {"training": config_to_dict(config), "metrics": metrics})
    print(format_metrics(metrics))
    print(f"trained in {metrics['train_seconds']} s on {metrics['device']}; saved to {out}")
    return 0


class SmallNetLoop:
    """What every small network's training loop shares: AdamW with the warm-up cosine schedule,
    one update per loss, the smoothed loss on a progress bar and a JSON line in
    ``log_dir/train_log.jsonl`` every ``log_every`` steps (and at the last one).

    Use as ``with SmallNetLoop(...) as loop: for step in loop: ...; loop.update(step, loss)``;
    ``loop.seconds`` is the training time once the block ends.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        *,
        lr: float,
        weight_decay: float,
        warmup_steps: int,
        steps: int,
        log_every: int,
        log_dir: str | Path,
        desc: str,
    ) -> None:
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=steps),
        )
        self.steps, self.log_every, self.desc = steps, log_every, desc
        self.log_path = Path(log_dir) / "train_log.jsonl"
        self.running = 0.0
        self.seconds = 0.0

    def __enter__(self) -> SmallNetLoop:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = self.log_path.open("w")
        self.bar = tqdm(range(self.steps), desc=self.desc)
        self.started = time.time()
        return self

    def __iter__(self) -> Iterator[int]:
        return iter(self.bar)

    def update(self, step: int, loss: torch.Tensor, **terms: torch.Tensor) -> None:
        """One optimizer step on ``loss``; ``terms`` (detached parts of it) go into the log."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        value = loss.item()
        self.running = value if step == 0 else 0.95 * self.running + 0.05 * value
        self.bar.set_postfix(loss=f"{self.running:.4f}")
        if step % self.log_every == 0 or step == self.steps - 1:
            record = {
                "step": step,
                "loss": round(value, 6),
                **{name: round(term.item(), 6) for name, term in terms.items()},
                "loss_ema": round(self.running, 6),
                "lr": self.scheduler.get_last_lr()[0],
                "elapsed_s": round(time.time() - self.started, 1),
            }
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.seconds = time.time() - self.started
        self.bar.close()
        self.log.close()
