"""python -m lgd.train CONFIG.yaml [key=value ...]: train and evaluate one trial, print its AP."""
from __future__ import annotations

import argparse
import logging
import sys

from lgd.config import load_config
from lgd.data.coco import DataError
from lgd.engine import NonFiniteLossError, train_loop
from lgd.typed import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lgd.train", description=__doc__)
    p.add_argument("config", help="YAML file of a TrainConfig")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lgd.enabled=true solver.iter_scale=0.001")
    p.add_argument("--resume", help="checkpoint folder or file to continue from")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        metrics = train_loop(cfg, resume_from=args.resume)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 3
    print(" ".join(f"{k}={v:.2f}" for k, v in metrics.items() if k.startswith(("bbox/", "segm/"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
