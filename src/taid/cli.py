"""Console entry points (``taid-train``, ``taid-cache-teacher``); ``scripts/*.py`` are thin
wrappers around these."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taid.config import Config

_TRAIN_EXTRA = ("transformers", "datasets", "accelerate", "safetensors", "yaml")


def _missing_train_extra() -> list[str]:
    """The training dependencies that are not installed (the losses need torch alone)."""
    import importlib.util

    return [name for name in _TRAIN_EXTRA if importlib.util.find_spec(name) is None]


def _config_from_args(
    prog: str, description: str, example: str, argv: list[str] | None
) -> Config | None:
    """Parse ``--config PATH [dotted.key=value ...]``; a config error is printed (None)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Every config key, its type, default and meaning: python -m taid.config",
    )
    parser.add_argument(
        "--config",
        "-c",
        required=True,
        metavar="PATH",
        help="YAML config, e.g. configs/quickstart.yaml of the repository",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {example}"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config and the data file, then exit without loading any model",
    )
    args = parser.parse_args(argv)
    missing = _missing_train_extra()
    if missing:
        print(
            f"{prog} needs the training dependencies ({', '.join(missing)} missing): "
            f"pip install 'taid[train]'",
            file=sys.stderr,
        )
        return None
    from taid.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
        if args.check:
            from taid.data import check_local_path

            check_local_path(config.data)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return None
    if args.check:
        print(
            f"config OK: loss {config.loss.name}, {config.train.max_steps} steps, data "
            f"{config.data.path}, output_dir {config.output_dir}"
        )
        raise SystemExit(0)
    return config


def train_main(argv: list[str] | None = None) -> int:
    """``taid-train --config PATH [dotted.key=value ...]``."""
    config = _config_from_args(
        "taid-train",
        "Distil a teacher LM into a student with TAID or a baseline loss, from a YAML config.",
        "train.max_steps=20 loss.name=fkl",
        argv,
    )
    if config is None:
        return 2
    from taid.checkpoint import CheckpointError
    from taid.config import ConfigError
    from taid.report import print_report
    from taid.trainer import train

    try:
        result = train(config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 2
    if result["is_main_process"]:
        print_report(result)
    return 0


def cache_main(argv: list[str] | None = None) -> int:
    """``taid-cache-teacher --config PATH [dotted.key=value ...]``."""
    config = _config_from_args(
        "taid-cache-teacher",
        "Run a config's teacher once over its data and write its outputs "
        "(cache.mode: topk, hidden or full) to teacher.cache_dir, for runs with "
        "teacher.source=cache. Resumable; run under accelerate launch for several processes.",
        "cache.mode=hidden teacher.cache_dir=PATH",
        argv,
    )
    if config is None:
        return 2
    from taid.cache import TeacherCache, write_cache
    from taid.config import ConfigError

    try:
        root = write_cache(config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process:
        cache = TeacherCache(root, verify=False)
        m = cache.manifest
        rows = sum(s["num_rows"] for s in m["shards"])
        print(
            f"teacher cache {root}: mode {m['mode']}"
            + (f" k={m['k']}" if m["k"] else "")
            + f", {m['dtype']}, {m['num_examples']} "
            f"examples, {rows} target tokens, {len(m['shards'])} shards, "
            f"{cache.bytes_per_token():.0f} bytes per token"
        )
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
