"""``python tests/train_until.py STEP ARGS...`` (under torchrun): the training CLI's options ARGS,
trained up to step STEP (0: to the end) and saved; for the resume tests of test_train_distributed."""
import sys

from protomem.training import Trainer, resolve

if __name__ == "__main__":
    until = int(sys.argv[1])
    trainer = Trainer(resolve(sys.argv[2:]))
    trainer.fit(until=until or None)
    trainer.close()
