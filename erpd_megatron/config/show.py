"""`erpd config --config RECIPE [a.b=c ...]`: print the resolved recipe as YAML."""

from __future__ import annotations

import argparse

import yaml

from erpd_megatron.config.loader import load_config, to_dict


def main(argv: list[str] | None = None) -> int:
    """Print the resolved config (defaults, inheritance and overrides applied)."""
    p = argparse.ArgumentParser(prog="erpd config")
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False))
    return 0
