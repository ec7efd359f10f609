"""Trainer: one training run of an encoder with a protomem head, on one process or many
(torchrun), with exact resume from a checkpoint."""
import contextlib
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from .. import distributed
from ..data import DoppelgangerBatchSampler, IdentityBatchSampler, SyntheticIdentities
from ..losses import MomentumEncoder
from ..mining import DoppelgangerLists, planted_recovery
from . import builders, resume
from .interrupt import StopRequest, ignore_sigint_in_worker
from .log import CSVLog, Progress, TensorBoard

FORMAT = "protomem-train-v1"
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _init_distributed(cfg):
    """Joins the torchrun process group (NCCL on GPU, gloo on CPU) when WORLD_SIZE > 1; True when
    this call created it (the Trainer then destroys it in ``close``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
        dist.init_process_group("nccl" if use_cuda else "gloo")
        return True
    return False


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
        self._owns_group = _init_distributed(cfg)
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
        self.sampler = self._build_sampler(cfg)
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
        self.window = []  # losses of the steps since the last log row (saved: a resume logs the same rows)
        self.resumed_from, self.interrupted = None, False
        if cfg["resume"]:
            self._resume(cfg["resume"])

    # ----------------------------------------------------------------------------- batches
    def _build_sampler(self, cfg):
        """G x k batches; with --mining doppelganger a fraction are look-alikes from the lists the
        steps feed (``self.lookalikes``; saved with the sampler's state)."""
        batch = (self.dataset.labels, cfg["identities_per_batch"], cfg["samples_per_identity"])
        pairs = cfg["head"] == "dcq"
        self.lookalikes = None
        if cfg.get("mining", "none") == "none":
            return IdentityBatchSampler(*batch, seed=cfg["seed"], pairs=pairs)
        self.lookalikes = DoppelgangerLists(self.dataset.num_classes, cfg["mining_k"])
        return DoppelgangerBatchSampler(*batch, self.lookalikes, cfg["mining_fraction"], seed=cfg["seed"],
                                        pairs=pairs)

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
            # built when needed: a mining sampler reads the look-alike lists the last step fed
            local = (self._local(self.sampler.batch(self.epoch, b))
                     for b in range(self.batches_done, len(self.sampler)))
            if synthetic:
                source = (self.dataset.get_batch(i, self.device) for i in local)
            else:
                source = iter(torch.utils.data.DataLoader(
                    self.dataset, batch_sampler=(i.tolist() for i in local),
                    num_workers=self.cfg["num_workers"], pin_memory=self.device.type == "cuda",
                    worker_init_fn=ignore_sigint_in_worker if self.cfg["num_workers"] else None))
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
        if self.lookalikes is not None:  # one transfer of the global batch's pairs
            self.lookalikes.update_packed(self.head.mining_pairs(packed=True))
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

    def close(self):
        """Leaves the process group this Trainer joined (after a barrier), so that no rank exits
        with the group's threads still running (a gloo group torn down at interpreter exit can
        abort the process). A no-op in one process; call it once ``fit`` has returned."""
        if self._owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self._owns_group = False

    def fit(self, until=None):
        """Trains to the end (or to step ``until``, then saves without the final evaluation, to
        be resumed later), evaluating and saving as configured; returns ``summary()``. A first
        Ctrl-C (or SIGTERM) stops after the current step, saves and sets ``interrupted``."""
        cfg, out = self.cfg, self.cfg["out"]
        main = self.rank == 0
        if main:
            os.makedirs(out, exist_ok=True)
            if cfg["progress"] or self.resumed_from:
                print(self.describe(), file=sys.stderr, flush=True)
        log = CSVLog(os.path.join(out, "log.csv")) if main else None
        board = TensorBoard(os.path.join(out, "tb"), cfg["tensorboard"]) if main else None
        bar = Progress(self.total_steps, self.step, cfg["progress"] and main)
        batches = self._batches()
        stop = self.total_steps if until is None else min(until, self.total_steps)
        rows = cfg["identities_per_batch"] * cfg["samples_per_identity"] * cfg["accum_steps"]
        t0 = time.perf_counter()
        with StopRequest() as request:
            while self.step < stop:
                self.window.append(self.train_step(batches))
                # not at an ``until`` stop: a resumed run logs the same rows as one run
                if self.step % cfg["log_every"] == 0 or self.step == self.total_steps:
                    self._sync()
                    dt = (time.perf_counter() - t0) / len(self.window)
                    self.step_times.append(dt)
                    stats = self._log_row(sum(self.window) / len(self.window), dt, rows)
                    if main:
                        log.write(stats)
                        board.scalars(self.step, stats, "train/")
                    bar.update(len(self.window), {k: stats[k] for k in ("loss", "accuracy", "samples_per_s", "head_mb")})
                    self.window, t0 = [], time.perf_counter()
                if cfg["eval_every"] and self.step % cfg["eval_every"] == 0 and self.step < self.total_steps:
                    self.evaluate(bar, board)
                    t0 = time.perf_counter()
                if cfg["save_every"] and self.step % cfg["save_every"] == 0:
                    self.save()
                    t0 = time.perf_counter()
                if request.agreed(self.world, self.device):
                    self.interrupted = True
                    break
            bar.close()
            evaluated = bool(self.eval_history) and self.eval_history[-1]["step"] == self.step
            if self.step == self.total_steps and not evaluated:  # a resumed finished run is not evaluated again
                self.evaluate(None, board)
            self.save()
        if board is not None:
            board.close()
        if self.interrupted and main:
            print(f"protomem-train: interrupted at step {self.step}/{self.total_steps}; saved "
                  f"{os.path.join(out, 'checkpoint.pt')}. Continue with:\n"
                  f"  python -m protomem.train --out {out} --resume auto", file=sys.stderr, flush=True)
        return self.summary()

    def describe(self):
        """The start-up summary: device, steps, batch, head and its size, data (a few lines)."""
        cfg = self.cfg
        dev = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
               else f"cpu ({torch.get_num_threads()} threads)")
        rows = cfg["identities_per_batch"] * cfg["samples_per_identity"]
        lines = [
            f"protomem-train: device {dev}" + (f" x {self.world} processes" if self.world > 1 else ""),
            f"  steps {self.step} -> {self.total_steps} ({self.steps_per_epoch} per epoch); batch "
            f"{cfg['identities_per_batch']} identities x {cfg['samples_per_identity']} samples = {rows} rows"
            + (f" x {cfg['accum_steps']} micro-batches" if cfg["accum_steps"] > 1 else ""),
            f"  head {builders.describe_head(self.head)}, margin {cfg['margin']}; encoder {cfg['backbone']} "
            f"-> {cfg['embedding_size']}-d; {cfg['optimizer']} lr {cfg['lr']:g}, {cfg['schedule']}, amp {cfg['amp']}",
            f"  data {cfg['data']}: {self.dataset.num_classes} identities, {len(self.dataset.labels)} samples; "
            f"out {cfg['out']}",
        ]
        if self.resumed_from:
            changes = cfg.get("resume_changes") or []
            lines.append(f"  resumed from {self.resumed_from} at step {self.step}; "
                         + ("changed: " + "; ".join(changes) if changes else "options as saved"))
        return "\n".join(lines)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _log_row(self, loss, dt, rows):
        head = self.head.last_stats
        return {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                "lr": self.optimizer.param_groups[0]["lr"], "loss": loss,
                # PM: the accuracy of the prototypes as they were before the step (its plain
                # accuracy is ~1.0 with exemplars="all": the row is in its refreshed prototype)
                "accuracy": head.get("prior_accuracy", head.get("accuracy", float("nan"))),
                "ms_per_step": 1000 * dt,
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
            for path in self.cfg["bin"]:
                r = evaluation.evaluate_bin(model, path, device=self.device)
                results.update({f"{r.get('name', path)}/{k}": v for k, v in r.items() if k != "name"})
            row = {"step": self.step, **results}
            self.eval_history.append(row)
            CSVLog(os.path.join(self.cfg["out"], "eval.csv")).write(row)
            if board is not None:
                board.scalars(self.step, results, "eval/")
            # printed with or without the progress bar: --no-progress silences only the bar
            (bar.write if bar is not None and bar.bar is not None else print)(
                f"eval at step {self.step}:\n" + evaluation.format_results(results))
        if self.world > 1:
            dist.barrier()
        return results

    def summary(self):
        """dict: steps, skipped steps, median ms per step, head memory (MB), last evaluation, and
        with mining on planted look-alikes (``--lookalikes``) ``mining``: the lists' recovery of
        the planted partners (``protomem.mining.planted_recovery``)."""
        times = sorted(self.step_times)
        out = {"steps": self.step, "skipped_steps": self.skipped, "interrupted": self.interrupted,
               "ms_per_step": 1000 * times[len(times) // 2] if times else None,
               "head_mb": self.head_memory_bytes() / 2**20,
               "eval": self.eval_history[-1] if self.eval_history else {}}
        if self.lookalikes is not None and getattr(self.dataset, "lookalikes", 0):
            truth = self.dataset.planted_partners(torch.arange(self.dataset.num_classes))
            out["mining"] = planted_recovery(self.lookalikes, truth)
        return out

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self):
        """Everything a resume needs (the head's state_dict is a collective for sharded heads)."""
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        # every rank's optimiser state: a sharded head's rows (and their momentum) differ per rank
        per_rank = None
        if self.world > 1:
            per_rank = [None] * self.world if self.rank == 0 else None
            dist.gather_object(self.optimizer.state_dict(), per_rank, dst=0)
        return {"format": FORMAT, "config": dict(self.cfg), "model": self.encoder.state_dict(),
                "optimizer_ranks": per_rank,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                "sampler": self.sampler.state_dict(self.batches_done) | {"epoch": self.epoch},
                "step": self.step, "skipped": self.skipped, "rng": rng, "last_seen": self.last_seen,
                "eval_history": self.eval_history, "log_window": list(self.window)}

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

    def _drop_mismatched_optimizer_state(self):
        """After a resume on another world size, a sharded head's rows differ from the saved
        shard's: their optimiser state (momentum) starts afresh, with a note."""
        dropped = [p for p in self.head.parameters()
                   if any(isinstance(v, torch.Tensor) and v.dim() and v.shape != p.shape
                          for v in self.optimizer.state.get(p, {}).values())]
        for p in dropped:
            del self.optimizer.state[p]
        if dropped and self.rank == 0:
            print("protomem-train: resumed on another world size: the optimiser state of the head's class "
                  "weights starts afresh (their values are re-sharded exactly)", file=sys.stderr)

    def _apply_optimizer_options(self):
        """After loading the optimiser and schedule: this run's lr, momentum and weight decay
        (a resume may change them) and the schedule's lr at the current step (its length may
        have changed). With unchanged options this recomputes the saved values exactly."""
        for group in self.optimizer.param_groups:
            if "momentum" in group:
                group["momentum"] = self.cfg["momentum"]
            group["weight_decay"] = self.cfg["weight_decay"]
        self.schedule.base_lrs = [self.cfg["lr"] for _ in self.optimizer.param_groups]
        for group, base, factor in zip(self.optimizer.param_groups, self.schedule.base_lrs, self.schedule.lr_lambdas):
            group["lr"] = base * factor(self.schedule.last_epoch)

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
        resume.check_compatible(ckpt["config"], self.cfg, path)
        self.encoder.load_state_dict(ckpt["model"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.head.load_state_dict(ckpt["head"])
        per_rank = ckpt.get("optimizer_ranks")
        same_world = per_rank is not None and len(per_rank) == self.world
        self.optimizer.load_state_dict(per_rank[self.rank] if same_world else ckpt["optimizer"])
        self._drop_mismatched_optimizer_state()
        self.schedule.load_state_dict(ckpt["schedule"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.sampler.load_state_dict(ckpt["sampler"])
        self.epoch, self.batches_done = ckpt["sampler"]["epoch"], ckpt["sampler"]["batches_done"]
        self.step, self.skipped = ckpt["step"], ckpt["skipped"]
        if self.last_seen is not None and ckpt.get("last_seen") is not None:
            self.last_seen.copy_(ckpt["last_seen"])
        self.eval_history = list(ckpt.get("eval_history", []))
        self.window = list(ckpt.get("log_window", []))
        self._apply_optimizer_options()
        if self.rank == 0:  # rows logged after this checkpoint are logged again from here
            for name in ("log.csv", "eval.csv"):
                CSVLog(os.path.join(self.cfg["out"], name)).keep_until(self.step)
        self.resumed_from = path
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)

