"""``python -m protomem.train`` (console script ``protomem-train``): train an identity encoder
with a protomem loss head on synthetic identities, insightface RecordIO or an image folder.

    python -m protomem.train --head pm --num-classes 20000 --epochs 2 --out runs/pm
    torchrun --nproc-per-node 8 -m protomem.train --data /data/ms1m --backbone iresnet50 --head pm
    python -m protomem.train --resume auto --out runs/pm          # continue a run exactly

Every option (``--help``) can also come from ``--config file.toml|json``."""
import json
import sys

from .training import Trainer, resolve


def main(argv=None):
    """Parses the options, trains, prints the final evaluation; returns the summary dict."""
    cfg = resolve(argv)
    trainer = Trainer(cfg)
    summary = trainer.fit()
    if trainer.rank == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=None))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
