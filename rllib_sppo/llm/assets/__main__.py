"""Builds a built-in tiny model with its builder (``python -m rllib_sppo.llm.assets tiny-chain-long``), into the cache;
``--ship`` then copies it over the package's shipped copy (how the shipped models are made)."""

import argparse
import logging
import shutil
from pathlib import Path

from rllib_sppo.llm.assets.tiny import SHIPPED, TINY_MODELS


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m rllib_sppo.llm.assets", description=__doc__)
    p.add_argument("name", choices=sorted(TINY_MODELS))
    p.add_argument("--cache-dir", help="where to build (default $RLLIB_SPPO_CACHE or ~/.cache/rllib_sppo)")
    p.add_argument("--max-seconds", type=float, help="the supervision's time limit (default: the builder's)")
    p.add_argument("--ship", action="store_true", help="copy the built folder over the package's shipped one")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    limit = {} if args.max_seconds is None else {"max_seconds": args.max_seconds}
    built = Path(TINY_MODELS[args.name](cache_dir=args.cache_dir, build=True, **limit))
    print(built)
    if args.ship:
        shutil.rmtree(SHIPPED / built.name, ignore_errors=True)
        shutil.copytree(built, SHIPPED / built.name)
        print(f"shipped as {SHIPPED / built.name}")


if __name__ == "__main__":
    main()
