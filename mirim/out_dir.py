"""A run's out_dir: claimed and locked for one run, its log.jsonl (written and read back), and what is
left in it when a run stops without saving."""
import fcntl
import json
import math
import os
import re

from mirim.atomic import atomic_file, write_json

TEMP_FILE = re.compile(r'\.tmp\d+$')
SHARDED_DIR = 'sharded'  # parallel='fsdp': the sharded checkpoints' folders, named by ckpt.dcp and best.dcp
CHECKPOINTS = ('ckpt.pt', 'best.pt', 'ckpt.dcp', 'best.dcp')


def claim_out_dir(out_dir, resume):
    """Make out_dir, check it can be written, and lock it for this run: a second run into the same
    out_dir is refused while this one goes on (the lock is the folder's own flock, so it leaves no
    file behind and goes with the process, even on kill -9). A new run (not resume) never writes
    over a previous run's checkpoints. -> the locked folder's file descriptor (keep it open).
    ValueError says what is wrong."""
    if not os.fspath(out_dir).strip():  # `--out_dir=` would write into the current folder, or fail obscurely
        raise ValueError("out_dir is empty: give the run's folder, e.g. --out_dir=out/run1")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f'.write_test_{os.getpid()}')
        try:
            with open(probe, 'w') as f:
                f.write('ok')
        finally:
            if os.path.exists(probe):
                os.remove(probe)
        lock = os.open(out_dir, os.O_RDONLY)
    except OSError as e:
        raise ValueError(f"out_dir {out_dir!r} is not writable: {e.strerror or e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        raise ValueError(f"another run is using {out_dir} (a training run still going on); wait for it to "
                         f"end, or choose another --out_dir") from None
    if not resume:
        previous = [f for f in CHECKPOINTS if os.path.lexists(os.path.join(out_dir, f))]
        if previous:
            os.close(lock)
            raise ValueError(f"{out_dir} already holds a run ({', '.join(previous)}): continue it with "
                             f"--init_from=resume, or choose another --out_dir (or delete it) to start over")
    # the lock is ours, so no run writes here: a temp file (mirim/atomic.py's NAME.tmpPID) is what a run
    # killed mid-save (kill -9, power loss) left behind, a full-size copy that would keep the disk full
    for name in os.listdir(out_dir):
        if TEMP_FILE.search(name) and (os.path.isfile(os.path.join(out_dir, name))
                                       or os.path.islink(os.path.join(out_dir, name))):
            os.remove(os.path.join(out_dir, name))
    remove_unlinked_shards(out_dir)
    return lock


def remove_unlinked_shards(out_dir):
    """Remove the folders of sharded/ that neither ckpt.dcp nor best.dcp names: older checkpoints, and
    what a run killed mid-save left (a STEP.tmp folder)."""
    import shutil
    folder = os.path.join(out_dir, SHARDED_DIR)
    if not os.path.isdir(folder):
        return
    linked = {os.path.realpath(os.path.join(out_dir, link)) for link in ('ckpt.dcp', 'best.dcp')}
    for name in os.listdir(folder):
        if os.path.realpath(os.path.join(folder, name)) not in linked:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def last_good(out_dir):
    """What a run that stops without saving leaves behind, for its error message."""
    for name in ('ckpt.pt', 'ckpt.dcp'):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            return f"{path} still holds the last good checkpoint"
    return "no checkpoint was written"


def read_log(path):
    """The records of a log.jsonl (or of out_dir/log.jsonl), in step order: the one reader of a run's log
    (plot.py, plan.py, and a resuming run itself). When a run was resumed from an earlier checkpoint,
    the steps it repeats replace the lines logged before the resume; a line cut short by a crash is
    skipped. FileNotFoundError when there is no log."""
    if os.path.isdir(path) or not path.endswith('.jsonl'):
        path = os.path.join(path, 'log.jsonl')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: give a training out_dir (holding log.jsonl) or a log.jsonl file")
    records = []
    with open(path, encoding='utf-8', errors='replace') as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a last line cut short by a crash
            if not isinstance(record, dict):
                continue
            step = record.get('step')
            while isinstance(step, (int, float)) and records and records[-1].get('step', -1) >= step:
                records.pop()
            records.append(record)
    return records


def open_log(out_dir, step):
    """log.jsonl for appending; on resume (step > 0), lines past the checkpoint's step are dropped
    first (the steps after the last save are trained again, and logged again)."""
    path = os.path.join(out_dir, 'log.jsonl')
    if step > 0 and os.path.exists(path):
        kept = [record for record in read_log(path) if record.get('step', 0) <= step]
        with atomic_file(path) as f:
            f.write(''.join(json.dumps(record) + '\n' for record in kept).encode('utf-8'))
    return open(path, 'a' if step > 0 else 'w', encoding='utf-8')


def clean_record(record):
    """JSON has no NaN or infinity: such numbers are logged as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class RunLog:
    """A run's log: one JSON line per record in out_dir/log.jsonl, and Weights & Biases when
    c.wandb_log. Only rank 0 writes; on the other ranks it does nothing. Call it with a record."""

    def __init__(self, c, step, rank):
        self.file = self.wandb = None
        self.out_dir = c.out_dir
        if rank != 0:
            return
        try:
            write_json(os.path.join(c.out_dir, 'config.json'), vars(c))
            self.file = open_log(c.out_dir, step)
        except OSError as e:
            self.failed(e)
        if c.wandb_log:
            import wandb  # only when asked for: a slow import
            self.wandb = wandb.init(project=c.wandb_project, config=vars(c),
                                    name=c.wandb_run_name or os.path.basename(os.path.abspath(c.out_dir)))

    def __call__(self, record):
        if self.file is not None:
            try:
                self.file.write(json.dumps(clean_record(record)) + '\n')
                self.file.flush()
            except OSError as e:
                self.failed(e)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if v is not None}, step=record['step'])

    def failed(self, error):
        """A log that cannot be written (a full disk): one line, and the checkpoint to resume from."""
        from mirim.common import fail  # here: plot.py reads logs through this file without importing torch
        file, self.file = self.file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass
        fail(f"cannot write the log in {self.out_dir}: {error.strerror or error}; {last_good(self.out_dir)} "
             f"(free some space, then --init_from=resume)")

    def close(self):
        if self.file is not None:
            try:
                self.file.close()
            except OSError as e:
                self.failed(e)
        if self.wandb is not None:
            self.wandb.finish()
