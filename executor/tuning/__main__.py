"""Command line: ``python -m executor.tuning run.json [--resume]`` trains the run described by a JSON/YAML file.

The same command runs under ``torchrun`` for many devices or machines (see README, "Many devices").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from executor.tuning import fit
from executor.tuning.finetuner_compat import finetuner_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m executor.tuning', description=__doc__.splitlines()[0])
    parser.add_argument('config', type=Path, help='a JSON or YAML file of TrainConfig fields')
    parser.add_argument('--resume', action='store_true', help="continue from the run folder's last checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    text = args.config.read_text()
    if args.config.suffix in ('.yml', '.yaml'):
        import yaml

        fields = yaml.safe_load(text)
    else:
        fields = json.loads(text)
    result = fit(finetuner_config(**fields), resume=args.resume)
    print(result.artifact)
    return 0


if __name__ == '__main__':
    sys.exit(main())
