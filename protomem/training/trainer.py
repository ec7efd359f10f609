"""Trainer: one training run of an encoder with a protomem head, on one process or many
(torchrun), with exact resume from a checkpoint."""
import contextlib
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from .. import distributed
from ..data import IdentityBatchSampler, SyntheticIdentities
from ..losses import MomentumEncoder
from . import builders
from .log import CSVLog, Progress, TensorBoard

FORMAT = "protomem-train-v1"
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _init_distributed(cfg):
    """Joins the torchrun process group (NCCL on GPU, gloo on CPU) when WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
        dist.init_process_group("nccl" if use_cuda else "gloo")


def _device(cfg):
    if cfg["device"] == "cpu" or (cfg["device"] == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def _tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Trainer:
    """Builds everything from an option dict (``protomem.training.config.resolve``) and trains.

    ``fit()`` runs to ``max_steps`` (or ``epochs``), logging to ``OUT/log.csv`` and
    ``OUT/eval.csv`` and saving ``OUT/checkpoint.pt``; a Trainer built with ``resume`` set
    continues a saved run exactly (same batches, same random numbers, same optimiser state).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        _init_distributed(cfg)
        self.rank, self.world = distributed.world()
        self.device = _device(cfg)
        torch.manual_seed(cfg["seed"])
        self.dataset = builders.build_dataset(cfg)
        self.encoder = builders.build_encoder(cfg).to(self.device)
        self.head = builders.build_head(cfg, self.dataset.num_classes, self.device)
        self.ema = MomentumEncoder(self.encoder, cfg["ema_momentum"]) if cfg["head"] == "dcq" else None
        self.model = self.encoder
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.encoder, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.model.register_comm_hook(None, distributed.sum_gradients_hook)
        self.sampler = IdentityBatchSampler(self.dataset.labels, cfg["identities_per_batch"],
                                            cfg["samples_per_identity"], seed=cfg["seed"],
                                            pairs=cfg["head"] == "dcq")
        self.steps_per_epoch = max(1, len(self.sampler) // cfg["accum_steps"])
        self.total_steps = int(cfg["max_steps"] or math.ceil(cfg["epochs"] * self.steps_per_epoch))
        self.optimizer = builders.build_optimizer(cfg, self.encoder, self.head)
        self.schedule = builders.build_schedule(cfg, self.optimizer, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg["amp"] == "fp16")
        self.step, self.epoch, self.batches_done, self.skipped = 0, 0, 0, 0
        # step each class was last in a (local) batch, -1 never: the x-axis of protomem.staleness
        self.last_seen = (torch.full((self.dataset.num_classes,), -1, dtype=torch.long, device=self.device)
                          if cfg["track_staleness"] else None)
        self.eval_history = []
        self.step_times = []
        if cfg["resume"]:
            self._resume(cfg["resume"])

    # ----------------------------------------------------------------------------- batches
    def _local(self, indices):
        """This rank's share of a global batch of dataset indices (pairs: queries then keys)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.world == 1:
            return idx
        if self.sampler.pairs:
            q, k = idx.chunk(2)
            return torch.cat([q.tensor_split(self.world)[self.rank], k.tensor_split(self.world)[self.rank]])
        return idx.tensor_split(self.world)[self.rank]

    def _batches(self):
        """Endless (x, y) local batches from the current (epoch, batches_done) on."""
        synthetic = isinstance(self.dataset, SyntheticIdentities)
        while True:
            plan = self.sampler.batches(self.epoch)
            local = [self._local(plan[b]) for b in range(self.batches_done, len(plan))]
            if synthetic:
                source = (self.dataset.get_batch(i, self.device) for i in local)
            else:
                source = iter(torch.utils.data.DataLoader(
                    self.dataset, batch_sampler=[i.tolist() for i in local],
                    num_workers=self.cfg["num_workers"], pin_memory=self.device.type == "cuda"))
            for x, y in source:
                self.batches_done += 1
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            self.epoch, self.batches_done = self.epoch + 1, 0

    # ----------------------------------------------------------------------------- one step
    def _loss(self, x, y):
        amp = self.cfg["amp"]
        with torch.autocast(self.device.type, dtype=_AMP.get(amp), enabled=amp != "none"):
            if self.ema is None:
                loss = self.head(self.model(x), y)
            else:
                xq, xk = x.chunk(2)
                y = y[: xq.shape[0]]
                loss = self.head(self.model(xq), self.ema(xk), y)
        if self.last_seen is not None:
            self.last_seen[y] = self.step
        return loss

    def train_step(self, batches):
        """One optimiser step over ``accum_steps`` micro-batches; returns the mean loss (float)."""
        accum, total = self.cfg["accum_steps"], 0.0
        finite = True
        for micro in range(accum):
            x, y = next(batches)
            sync = self.world == 1 or micro == accum - 1
            with self.model.no_sync() if not sync else contextlib.nullcontext():
                loss = self._loss(x, y)
                self.scaler.scale(loss / accum).backward()
            value = float(loss.detach())
            finite = finite and math.isfinite(value)
            total += value / accum
        if not finite and not self.scaler.is_enabled():  # never step on a non-finite loss
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
        else:
            if self.cfg["clip_grad"]:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), self.cfg["clip_grad"])
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        return total

    # ----------------------------------------------------------------------------- the run
    def head_memory_bytes(self):
        """Bytes of the head on this rank: its state (memory, queue or class weights), the
        gradients of its parameters and their optimiser state."""
        params = list(self.head.parameters())
        state = [v for p in params for v in self.optimizer.state.get(p, {}).values()
                 if isinstance(v, torch.Tensor)]
        # parameters and buffers, not state_dict(): that gathers a sharded head's whole weight
        return _tensor_bytes(params + list(self.head.buffers()) + [p.grad for p in params] + state)

    def fit(self, until=None):
        """Trains to the end (or to step ``until``, then saves without the final evaluation, to
        be resumed later), evaluating and saving as configured; returns ``summary()``."""
        cfg, out = self.cfg, self.cfg["out"]
        main = self.rank == 0
        if main:
            os.makedirs(out, exist_ok=True)
        log = CSVLog(os.path.join(out, "log.csv")) if main else None
        board = TensorBoard(os.path.join(out, "tb"), cfg["tensorboard"]) if main else None
        bar = Progress(self.total_steps, self.step, cfg["progress"] and main)
        batches = self._batches()
        stop = self.total_steps if until is None else min(until, self.total_steps)
        rows = cfg["identities_per_batch"] * cfg["samples_per_identity"] * cfg["accum_steps"]
        window, t0 = [], time.perf_counter()
        while self.step < stop:
            window.append(self.train_step(batches))
            if self.step % cfg["log_every"] == 0 or self.step == stop:
                self._sync()
                dt = (time.perf_counter() - t0) / len(window)
                self.step_times.append(dt)
                stats = self._log_row(sum(window) / len(window), dt, rows)
                if main:
                    log.write(stats)
                    board.scalars(self.step, stats, "train/")
                bar.update(len(window), {k: stats[k] for k in ("loss", "accuracy", "samples_per_s", "head_mb")})
                window, t0 = [], time.perf_counter()
            if cfg["eval_every"] and self.step % cfg["eval_every"] == 0 and self.step < self.total_steps:
                self.evaluate(bar, board)
                t0 = time.perf_counter()
            if cfg["save_every"] and self.step % cfg["save_every"] == 0:
                self.save()
                t0 = time.perf_counter()
        bar.close()
        if self.step == self.total_steps:
            self.evaluate(None, board)
        self.save()
        if board is not None:
            board.close()
        return self.summary()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _log_row(self, loss, dt, rows):
        head = self.head.last_stats
        return {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                "lr": self.optimizer.param_groups[0]["lr"], "loss": loss,
                "accuracy": head.get("accuracy", float("nan")), "ms_per_step": 1000 * dt,
                "samples_per_s": rows / dt, "head_mb": self.head_memory_bytes() / 2**20,
                "skipped_steps": self.skipped}

    def evaluate(self, bar=None, board=None):
        """Evaluates on rank 0 (held-out samples and identities of synthetic data; .bin sets);
        appends to ``eval_history`` and ``OUT/eval.csv``. Returns the results dict."""
        results = {}
        if self.rank == 0:
            from .. import evaluation

            model = (self.ema.encoder if self.ema is not None else self.encoder)
            if isinstance(self.dataset, SyntheticIdentities):
                groups = evaluation.choose_eval_classes(self.dataset, max_per_group=self.cfg["eval_classes"],
                                                        seed=self.cfg["seed"])
                results.update(evaluation.evaluate_identities(
                    model, self.dataset, groups, heldout_classes=self.cfg["eval_classes"], device=self.device))
            for path in filter(None, str(self.cfg["val_bins"]).split(",")):
                r = evaluation.evaluate_bin(model, path.strip(), device=self.device)
                results.update({f"{r.get('name', path)}/{k}": v for k, v in r.items() if k != "name"})
            row = {"step": self.step, **results}
            self.eval_history.append(row)
            CSVLog(os.path.join(self.cfg["out"], "eval.csv")).write(row)
            if board is not None:
                board.scalars(self.step, results, "eval/")
            if self.cfg["progress"]:
                (bar.write if bar is not None else print)(
                    f"eval at step {self.step}:\n" + evaluation.format_results(results))
        if self.world > 1:
            dist.barrier()
        return results

    def summary(self):
        """dict: steps, skipped steps, median ms per step, head memory (MB), last evaluation."""
        times = sorted(self.step_times)
        return {"steps": self.step, "skipped_steps": self.skipped,
                "ms_per_step": 1000 * times[len(times) // 2] if times else float("nan"),
                "head_mb": self.head_memory_bytes() / 2**20,
                "eval": self.eval_history[-1] if self.eval_history else {}}

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self):
        """Everything a resume needs (the head's state_dict is a collective for sharded heads)."""
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"format": FORMAT, "config": dict(self.cfg), "model": self.encoder.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                "sampler": self.sampler.state_dict(self.batches_done) | {"epoch": self.epoch},
                "step": self.step, "skipped": self.skipped, "rng": rng, "last_seen": self.last_seen}

    def save(self, path=None):
        """Writes the checkpoint (rank 0; atomically) to ``path`` or OUT/checkpoint.pt."""
        state = self.state_dict()  # every rank: the sharded heads gather here
        if self.rank == 0:
            path = path or os.path.join(self.cfg["out"], "checkpoint.pt")
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)
        if self.world > 1:
            dist.barrier()

    def _resume(self, path):
        if path == "auto":
            path = os.path.join(self.cfg["out"], "checkpoint.pt")
            if not os.path.exists(path):
                return
        if not os.path.exists(path):
            raise FileNotFoundError(f"resume: checkpoint {path!r} not found")
        ckpt = torch.load(path, map_location=self.device, weights_only=False)
        if ckpt.get("format") != FORMAT:
            raise ValueError(f"{path} is not a protomem training checkpoint (format {ckpt.get('format')!r})")
        self.encoder.load_state_dict(ckpt["model"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.head.load_state_dict(ckpt["head"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.sampler.load_state_dict(ckpt["sampler"])
        self.epoch, self.batches_done = ckpt["sampler"]["epoch"], ckpt["sampler"]["batches_done"]
        self.step, self.skipped = ckpt["step"], ckpt["skipped"]
        if self.last_seen is not None and ckpt.get("last_seen") is not None:
            self.last_seen.copy_(ckpt["last_seen"])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)

