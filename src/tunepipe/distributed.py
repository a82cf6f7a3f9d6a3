"""Training on several processes (DDP through HF Trainer: NCCL on GPUs, gloo on CPUs).

`TUNEPIPE_NPROC=N dvc repro` makes finetune re-launch itself through torch's own launcher (torchrun) with N
processes on this node; `torchrun ...` or `accelerate launch ...` typed by hand work too (their WORLD_SIZE/RANK
environment is what every function here reads). The process count is how a run is launched, not what it computes,
so it is an environment variable rather than a param: changing it does not invalidate DVC's cache, and
finetune.batch_size stays the global batch (split across the processes).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

import torch

from tunepipe.errors import UserError

NPROC_ENV = "TUNEPIPE_NPROC"


def requested_processes() -> int:
    """TUNEPIPE_NPROC as a process count (1 when unset)."""
    raw = os.environ.get(NPROC_ENV, "").strip()
    if not raw:
        return 1
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"{NPROC_ENV}: must be a positive whole number of training processes, got {raw!r}; "
                        f"unset it (or set it to 1) to train in one process")
    return n


def launched() -> bool:
    """Inside a distributed launch (torchrun, accelerate launch): the launcher set these for each process."""
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Global rank 0: the one process that writes outputs and talks to MLflow."""
    return rank() == 0


def ddp_backend() -> str | None:
    """gloo on CPUs; None leaves accelerate's choice (NCCL on CUDA GPUs)."""
    return "gloo" if world_size() > 1 and not torch.cuda.is_available() else None


def per_device_batch(batch_size: int, processes: int) -> int:
    """finetune.batch_size is the global batch: each process takes an equal share of it."""
    if batch_size % processes:
        raise UserError(f"finetune.batch_size: {batch_size} does not divide among {processes} training processes "
                        f"(it is the global batch, split evenly); make it a multiple of {processes}, or change the "
                        f"process count ({NPROC_ENV} or the launcher's)")
    return batch_size // processes


def init() -> None:
    """Join the process group now (Trainer would only do so when its arguments are built), so the ranks can agree
    on the run before training: accelerate's state is what TrainingArguments then reuses."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available(), backend=ddp_backend())


def from_main(value):
    """Rank 0's `value` on every rank (each rank passes its own; only rank 0's is kept)."""
    if world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def finish() -> None:
    """Leave the process group cleanly (torch warns at exit about a group never destroyed)."""
    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def lost_peer(exc: BaseException) -> bool:
    """A collective failed because another process of the group went away (killed, crashed)."""
    return isinstance(exc, torch.distributed.DistError) or (
        isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("gloo", "Connection closed by peer",
                                                                      "Connection reset by peer", "NCCL")))


def threads_per_process(processes: int) -> int:
    """CPU cores this process may use, shared out: torchrun's own default is 1 thread per process."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // processes)


def relaunch(module: str, processes: int, what: str, args: list[str] = ()) -> int:
    """Run `python -m module *args` as `processes` processes on this node under torchrun; the exit status to end
    with.

    Only rank 0's output reaches the console (the others' goes to log files, shown when one of them fails on its
    own). When a process dies, torchrun stops the others; instead of its report (a traceback and a table) this
    prints one line naming the process."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not os.environ.get("TUNEPIPE_DEBUG"):  # the launcher's own warnings and failure report
        # torch's elastic loggers each get their own level (LOGLEVEL), so a parent's level would not reach them
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(processes)))
    with tempfile.TemporaryDirectory(prefix="tunepipe-ranks-") as logs:
        others = ",".join(f"{r}:3" for r in range(1, processes))  # 3: stdout and stderr to files
        args = ["--standalone", f"--nproc-per-node={processes}", f"--log-dir={logs}",
                *([f"--redirects={others}"] if others else []), "-m", module, *args]
        try:
            run(parse_args(args))
        except ChildFailedError as exc:
            return _report_failure(exc, what, Path(logs))
        except SignalException as exc:  # Ctrl-C or SIGTERM: torchrun stopped the processes, and rank 0 said so
            return 128 + int(exc.sigval)
    return 0


# A process that exits like this has already said why (a UserError's line, an interrupt): nothing to add.
_SAID = (2, 130, 143)
# A process that lost the others (a collective failed) exits with this: a consequence, not the cause.
LOST_CONTACT = 3


# What a re-run does, by command.
AGAIN = {"finetune": "Run it again (`dvc repro`): it resumes from the last checkpoint in models/checkpoints, if one "
                     "was saved",
         "sweep": "Run it again (`tunepipe sweep`): the study goes on, the interrupted trial runs again once its "
                  "heartbeat is stale"}


def _report_failure(exc, what: str, logs: Path) -> int:
    # The root cause: a process killed by a signal (not torchrun's SIGTERM to the others), else one that failed on its
    # own, else the first (the others fail on losing it; timestamps are whole seconds).
    def cause(item) -> tuple[int, int]:
        code = item[1].exitcode
        return (0 if code < 0 and -code not in (signal.SIGTERM, signal.SIGINT) else 1 if code not in _SAID + (
            LOST_CONTACT, -signal.SIGTERM, -signal.SIGINT) else 2, item[1].timestamp)

    failures = sorted(exc.failures.items(), key=cause)
    failed_rank, failure = failures[0]
    code = failure.exitcode
    if code in _SAID:
        return code
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"failed (exit status {code})"
        if failed_rank != 0:  # its output went to a file: show how it ended
            for err in logs.glob(f"*/attempt_*/{failure.local_rank}/stderr.log"):
                sys.stderr.write("".join(err.read_text(errors="replace").splitlines(keepends=True)[-15:]))
    print(f"error: {what}: training process rank {failed_rank} (pid {failure.pid}) {how}; the other processes were "
          f"stopped. {AGAIN.get(what, AGAIN['finetune'])}", file=sys.stderr)
    return 1
