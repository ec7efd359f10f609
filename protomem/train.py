"""``python -m protomem.train`` (console script ``protomem-train``): train an identity encoder
with a protomem loss head on synthetic identities, insightface RecordIO or an image folder.

    python -m protomem.train --head pm --num-classes 20000 --epochs 2 --out runs/pm
    torchrun --nproc-per-node 8 -m protomem.train --data /data/ms1m --backbone iresnet50 --head pm
    python -m protomem.train --out runs/pm --resume auto          # continue a run exactly

Every option (``--help``) can also come from ``--config file.toml|json``. A resume takes the run's
options from its checkpoint; options given with it override those that keep the resume exact."""
import json
import math
import sys

from .training import Trainer
from .training.config import ConfigError, build_parser, resolve


def json_safe(value):
    """``value`` with every non-finite float as None (JSON has no NaN or infinity)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv=None):
    """Parses the options, trains, prints the summary (with the last evaluation) as one JSON
    line; returns the summary dict. Bad options exit with code 2 and an argparse message, an
    interrupted run (Ctrl-C) with 130 after saving."""
    parser = build_parser()
    try:
        cfg = resolve(argv, parser=parser)
        trainer = Trainer(cfg)
    except ConfigError as e:
        parser.error(str(e))
    summary = trainer.fit()
    trainer.close()  # after a clean fit only: a barrier with a failed rank would wait for it
    if trainer.rank == 0:
        print(json.dumps(json_safe(summary), allow_nan=False))
    if trainer.interrupted:
        sys.exit(130)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
