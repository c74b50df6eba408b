"""Launching and guarding a run: torchrun's env vars, the out_dir lock, preemption signals, stalled ranks."""
import datetime
import errno
import fcntl
import os
import signal
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data.common import remove_stale_temps

CUDA = torch.cuda.is_available()
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}  # dense bf16 per GPU (TF32: half)
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL)  # flock: unsupported


@dataclass
class Launch:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def master(self):
        return self.rank == 0


def setup_distributed(device, timeout_minutes=30):
    """Rank, world size and device from torchrun's env vars (RANK, LOCAL_RANK, WORLD_SIZE); joins
    the process group when there is more than one process; TF32 matmuls on CUDA. -> Launch."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if str(device).startswith("cuda"):
        if not CUDA:
            raise ValueError(f"device {device!r} asked for but CUDA is not available; use device='cpu'")
        device = device if ":" in device else f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return Launch(rank, local_rank, world, str(device))


def cpu_has_bf16():
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX, read from /proc/cpuinfo): there
    bf16 autocast trains faster than fp32 (docs/quickstart.md); elsewhere bf16 is emulated, and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


CPU_BF16 = cpu_has_bf16()  # a fact of the CPU, whatever else the machine has


def peak_flops(device, dtype):
    """Dense peak FLOP/s of one GPU for MFU (TF32 is half of bf16), or 0 when unknown / not CUDA."""
    if not str(device).startswith("cuda"):
        return 0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 0) * (0.5 if dtype == "fp32" else 1)


def seed_of(*keys):
    """A well-mixed 63-bit seed from integers, e.g. (seed, step, chunk)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def claim_out_dir(out_dir):
    """Make out_dir, check it is writable and lock it for this run (an OS lock: the dead never
    hold it). Returns the open lock file, to keep for the run's lifetime."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, ".lock"), "a+")
    except OSError as e:
        raise ValueError(f"out_dir {out_dir} is not writable ({e.strerror}): checkpoints could not be saved") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ValueError(f"out_dir {out_dir} is in use by another training run (pid {holder or '?'}); "
                             "wait for it to end or choose another out_dir") from None
        what = ("is on a filesystem without file locks" if e.errno in NO_LOCKS else "could not be locked")
        raise ValueError(f"out_dir {out_dir} {what} (flock: {e.strerror or e}), and train.py locks it so "
                         "that two runs never write one out_dir; put out_dir on a shared filesystem with "
                         "locking (Lustre mounted with -o flock, NFSv4, GPFS; a local disk only for one-node "
                         "runs)") from None
    lock.seek(0), lock.truncate(), lock.write(f"{os.getpid()}\n"), lock.flush()
    return lock


class NonFiniteError(RuntimeError):
    pass


class StalledError(RuntimeError):
    pass


class Guard:
    """Everything around the training loop that is not training, as one context manager: the out_dir
    lock (rank 0, before any long work; then the temporary files of killed writers are deleted), the
    preemption signals (SIGTERM, SIGUSR1, Ctrl-C: save at the next step boundary; a second Ctrl-C exits
    at once), the step collectives' short timeout (a stuck rank ends the run naming it), every rank
    starting from rank 0's checkpoint and data (same_start), rank 0's checkpoint writes that the others
    wait for (save), and on exit the lock, handlers and process group released."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, run, out_dir, step_timeout_minutes):
        self.run, self.out_dir, self.timeout = run, out_dir, step_timeout_minutes
        self.signals, self.group, self.monitor, self.lock, self.step = [], None, None, None, 0

    def __enter__(self):
        self.old_handlers = {s: signal.signal(s, self.on_signal) for s in self.SIGNALS}
        self.lock = claim_out_dir(self.out_dir) if self.run.master else None
        gone = remove_stale_temps(self.out_dir, owned=("ckpt.pt", "log.jsonl")) if self.run.master else []
        if gone:  # torn writes of killed runs (ours: we hold the lock; others': their writer is dead)
            print(f"removed {len(gone)} temporary file(s) of killed writers from {self.out_dir}", flush=True)
        if self.run.world > 1:  # steps get a short timeout: a stuck rank must not stall the job for long
            minutes = datetime.timedelta(minutes=self.timeout)
            self.group = dist.new_group(timeout=minutes)
            self.monitor = dist.new_group(backend="gloo", timeout=minutes)
        return self

    def on_signal(self, signum, frame):  # cluster preemption or Ctrl-C: save at the next step boundary
        if signum == signal.SIGINT and self.signals:
            print("second Ctrl-C: exiting now, without saving", file=sys.stderr, flush=True)
            os._exit(130)
        self.signals.append(signum)

    def wrap(self, model, find_unused):
        """DDP over the short-timeout group when there is more than one process."""
        if self.run.world == 1:
            return model
        ids = [self.run.local_rank] if self.run.device.startswith("cuda") else None
        return DDP(model, device_ids=ids, find_unused_parameters=find_unused, process_group=self.group)

    def same_start(self, **mine):
        """Refuse to start unless every rank has the same values as rank 0 (the step and checkpoint it
        resumed, the data's fingerprint): a node-local out_dir or data_dir makes ranks start apart."""
        if self.run.world == 1:
            return
        every = [None] * self.run.world
        dist.all_gather_object(every, mine)  # the default group: its 30-minute timeout
        said = lambda r: (f"resumed step {r['step']} (checkpoint {r['checkpoint']})" if r["checkpoint"] else
                          "found no checkpoint (step 0)")
        for rank, theirs in enumerate(every[1:], 1):
            if theirs["resumed"] != every[0]["resumed"]:
                raise ValueError(
                    f"rank {rank} {said(theirs['resumed'])} but rank 0 {said(every[0]['resumed'])} in "
                    f"{os.path.join(self.out_dir, 'ckpt.pt')}: the ranks see different out_dirs; out_dir "
                    "must be on a filesystem every node sees (a shared mount, not a node-local disk)")
            if theirs != every[0]:
                raise ValueError(f"rank {rank} reads other training data than rank 0 (fingerprints "
                                 f"{theirs['data']} vs {every[0]['data']}): data_dir must hold the same "
                                 "dataset on every node")

    def save(self, write, path):
        """Rank 0 writes a checkpoint (write()) while the other ranks wait for it on the default group
        (its 30-minute timeout, not the steps' short one: a big checkpoint on a slow filesystem takes
        minutes) and learn whether it was written: a failed write ends every rank. -> path."""
        error = None
        if self.run.master:
            try:
                write()
            except Exception as e:  # noqa: BLE001 (re-raised below, after the others were told)
                error = e
        if self.run.world > 1:
            ok = torch.tensor([float(error is None)], device=self.run.device)
            dist.broadcast(ok, src=0)
            if not ok.item() and not self.run.master:
                raise OSError(f"rank {self.run.rank}: rank 0 could not write {path} (its error says why)")
        if error is not None:
            raise error
        return path

    def agree(self, loss, norm, step):
        """-> (bad, stop) of step `step` (0-based), the same on every rank: skip the update if any rank's loss
        or grad norm is not finite; stop (the signal number) if any rank was signalled. The one host sync."""
        flags = torch.stack([~(loss.isfinite() & norm.isfinite()),
                             torch.tensor(max(self.signals, default=0), device=loss.device)]).float()
        if self.run.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        bad, stop = (int(v) for v in flags.tolist())
        self.step = step + 1  # the last step every rank reached, for the stall message
        return bad, stop

    def skip_update(self, step, loss, norm, in_a_row, max_in_a_row, last_good, jlog):
        """Say that this step's update was skipped; max_in_a_row skips in a row end the run."""
        if self.run.master:
            print(f"step {step + 1}: non-finite loss {loss.item()} / grad norm {norm.item()}, update skipped "
                  f"({in_a_row} in a row)", flush=True)
        jlog({"step": step + 1, "event": "nonfinite", "loss": loss.item(), "grad_norm": norm.item()})
        if in_a_row >= max_in_a_row:
            raise NonFiniteError(f"non-finite loss {in_a_row} steps in a row at step {step + 1}; last good "
                                 f"checkpoint: {last_good or 'none written yet'}")

    def stuck_ranks(self, seconds=10):
        """After a failed collective: which ranks do not answer a (gloo) monitored barrier now."""
        try:
            dist.monitored_barrier(group=self.monitor, timeout=datetime.timedelta(seconds=seconds),
                                   wait_all_ranks=True)
            return "every rank answers a barrier now"
        except RuntimeError as e:
            return str(e).strip().split("\n")[0]

    def __exit__(self, kind, error, tb):
        if self.lock is not None:
            self.lock.close()  # releases the out_dir lock
        for sig, handler in self.old_handlers.items():
            signal.signal(sig, handler)
        try:
            if self.monitor is not None and isinstance(error, RuntimeError) and not isinstance(error, NonFiniteError):
                raise StalledError(
                    f"rank {self.run.rank}: a collective failed at step {self.step + 1} (a rank stalled for "
                    f"step_timeout_minutes {self.timeout:g}, or died): {str(error).strip()[:300]}; "
                    f"{self.stuck_ranks(min(10.0, 60 * self.timeout))}") from None
        finally:
            if self.run.world > 1:
                dist.destroy_process_group()
        return False
