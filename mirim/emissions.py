"""
The energy a training run uses and the CO2-equivalent it emits, measured with CodeCarbon's offline
tracker, for log.jsonl, the run's summary line and the model card (mirim/model_card.py).

- Offline: no network and no files. The grid's carbon intensity comes from CodeCarbon's own table for
  the country the setting `emissions_country` names (a 3-letter ISO code, 'BRA'); '' takes its world
  average. No CSV, no API, no Electricity Maps look-up (even if a ~/.codecarbon.config asks for them),
  and CodeCarbon's own log lines are silenced: one line of ours says what is measured.
- What is measured: the whole machine (CodeCarbon's "machine" mode): CPU (RAPL counters where Linux lets
  them be read, else an estimate from the CPU's TDP and its load), RAM (an estimate from its size) and
  the GPUs this run uses on the node (NVML's energy counters). So one tracker runs per node (local rank 0);
  the other processes of a node measure nothing, and the nodes' sums are added up (an all-reduce).
- Summed across resumes: a resumed run starts from the highest total its log.jsonl holds, which includes
  the energy of steps trained after the last checkpoint and trained again after the resume (they were
  paid for). The energy between a crash and the last log line before it is lost.
- `emissions = False` turns it off; codecarbon missing, or a tracker that cannot start (hardware it
  cannot read), is one line and the run goes on without the numbers.
"""
import logging
import os
import platform
import sys

from mirim.common import fail, print0
from mirim.out_dir import read_log

LOG_KEYS = ('energy_kwh', 'emissions_kg')  # what each log.jsonl record gets


def known_countries():
    """{ISO code: country name} of the countries CodeCarbon has an energy mix for."""
    from codecarbon.input import DataSource
    return {code: mix.get('country_name', code) for code, mix in DataSource().get_global_energy_mix_data().items()}


def hardware_text(device, world_size):
    """What the run computes on, e.g. '8 x NVIDIA H100 80GB HBM3', 'AMD EPYC 7B13 (2 threads)' or, where torch
    uses fewer threads than the CPU has (OMP_NUM_THREADS=1), 'AMD EPYC 7B13 (1 of 2 threads)'."""
    import torch
    if device.startswith('cuda'):
        return f"{world_size} x {torch.cuda.get_device_name(device)}"
    processes = f", {world_size} processes" if world_size > 1 else ""
    if device.startswith('mps'):
        return f"Apple {platform.machine()} (mps{processes})"
    used, machine = torch.get_num_threads(), os.cpu_count()
    threads = f"{used} of {machine}" if machine and used < machine else f"{used}"
    return f"{cpu_name()} ({threads} thread{'s' if max(used, machine or 1) > 1 else ''}{processes})"


def cpu_name():
    try:
        with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'CPU'


def used_gpus(device):
    """The GPU ids (as CodeCarbon reads them) this node's processes use: cuda:0..LOCAL_WORLD_SIZE-1 under
    torchrun, the one device otherwise, through CUDA_VISIBLE_DEVICES when it renumbers them. None off CUDA
    (CodeCarbon then counts the machine's GPUs, if it has any)."""
    if not device.startswith('cuda'):
        return None
    import torch
    local = range(int(os.environ['LOCAL_WORLD_SIZE'])) if 'LOCAL_WORLD_SIZE' in os.environ else \
        [torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()]
    visible = [v.strip() for v in os.environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if v.strip()]
    return [visible[i] if i < len(visible) else str(i) for i in local]


class Meter:
    """One run session's energy meter. Meter(c, ...) checks the settings; start() starts the tracker (on
    a node's local rank 0); wrap(log) adds the totals to every record the run logs; summary() is the text
    for the last line; stop() ends the tracker."""

    def __init__(self, c, rank, world_size, device):
        self.on, self.country, self.init_from = c.emissions, c.emissions_country, c.init_from
        self.out_dir, self.rank, self.world_size, self.device = c.out_dir, rank, world_size, device
        self.tracker, self.before, self.last, self.hardware = None, (0.0, 0.0), None, None
        self.location = 'world average'
        self.local_leader = int(os.environ.get('LOCAL_RANK', 0)) == 0
        if not isinstance(self.country, str):
            fail("emissions_country must be a string: a 3-letter ISO code such as 'BRA', or '' (world average)")
        self.country = self.country.strip().upper()
        if not self.on:
            return
        try:
            countries = known_countries()
        except ImportError:
            countries = None  # said in start(), by the processes that would measure
        if countries is not None and self.country and self.country not in countries:
            fail(f"emissions_country={c.emissions_country!r} is not a country CodeCarbon has data for: give a "
                 f"3-letter ISO code such as 'BRA', 'USA', 'IND', 'DEU' (or '' for the world average, or "
                 f"emissions=False)")
        name = (countries or {}).get(self.country)
        self.location = f"{name} ({self.country})" if name else 'world average'

    def start(self):
        """Start measuring this session: read what earlier sessions of a resumed run logged, then start
        the tracker on this node's first process."""
        self.hardware = hardware_text(self.device, self.world_size)
        if not self.on:
            return
        if self.init_from == 'resume' and self.rank == 0:
            self.before = logged_totals(self.out_dir)
        if not self.local_leader:
            return
        self.tracker = start_tracker(self.country, used_gpus(self.device))
        if self.tracker is None:
            return
        measured = ', '.join(measured_parts(self.tracker))
        place = self.location if self.country else "the world average (set emissions_country)"
        say = print0 if self.rank == 0 else lambda text: print(f"rank {self.rank}: {text}")
        say(f"energy: CodeCarbon offline tracker, carbon intensity of {place}; measuring {measured}")

    def totals(self):
        """(kWh, kg CO2-eq) since the run began, all nodes and sessions, or None when nothing is measured.
        Every process must call it at the same time (an all-reduce)."""
        import torch
        here = [0.0, 0.0, 0.0]
        if self.tracker is not None:
            kg = self.tracker.flush()  # measures now (flush writes nothing: the tracker has no outputs)
            energy = getattr(self.tracker, '_total_energy', None)
            if kg is not None and energy is not None:
                here = [float(energy.kWh), float(kg), 1.0]
        if self.world_size > 1:
            summed = torch.tensor(here, dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(summed)
            here = summed.tolist()
        if not here[2]:
            return None
        return self.before[0] + here[0], self.before[1] + here[1]

    def wrap(self, log):
        """log (a RunLog) with the totals added to each record; a session's first record also says what it ran
        on, and a new run's first record (step 0) what it started from."""
        first = [True]

        def log_with_totals(record):
            record = dict(record)
            if first[0]:
                record['hardware'] = self.hardware
                if record.get('step') == 0:
                    record['init_from'] = self.init_from
                first[0] = False
            if self.on:
                found = self.totals()
                if found is not None:
                    if self.last is None:  # where the grid's carbon intensity is from, once a session
                        record['emissions_location'] = self.location
                    self.last = found
                    record.update(zip(LOG_KEYS, found))
            log(record)
        log_with_totals.close = log.close
        return log_with_totals

    def summary(self):
        """'; 0.0123 kWh, 4.56 g CO2-eq' for the summary line: the totals last logged ('' when none)."""
        if self.last is None:
            return ''
        kwh, kg = self.last
        return f"; energy {kwh:.4g} kWh, {kg * 1000:.3g} g CO2-eq"

    def stop(self):
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            tracker.stop()


def logged_totals(out_dir):
    """The highest (kWh, kg) an earlier session of the run logged: the totals only grow."""
    try:
        records = read_log(out_dir)
    except (FileNotFoundError, OSError):
        return 0.0, 0.0
    kwh = max((r['energy_kwh'] for r in records if isinstance(r.get('energy_kwh'), (int, float))), default=0.0)
    kg = max((r['emissions_kg'] for r in records if isinstance(r.get('emissions_kg'), (int, float))), default=0.0)
    return float(kwh), float(kg)


def start_tracker(country, gpu_ids):
    """A started OfflineEmissionsTracker that writes and sends nothing, or None after one line saying why."""
    try:
        from codecarbon import OfflineEmissionsTracker
    except ImportError as e:
        print(f"energy: not measured: codecarbon cannot be imported ({e}); pip install codecarbon, or set "
              f"emissions=False", file=sys.stderr)
        return None
    logging.getLogger('codecarbon').setLevel(logging.CRITICAL)  # before the constructor, which logs already
    tracker = OfflineEmissionsTracker(
        country_iso_code=country or None, gpu_ids=gpu_ids, tracking_mode='machine', log_level='critical',
        output_methods=[], emissions_endpoint=None, electricitymaps_api_token=None, allow_multiple_runs=True,
        project_name='mirim')
    # CodeCarbon would still take an Electricity Maps token from a config file under its old name (an API
    # call each measurement): offline means offline
    tracker._electricitymaps_api_token = None
    tracker.start()  # CodeCarbon catches its own errors: a tracker that did not start has no start time
    if getattr(tracker, '_start_time', None) is None or not getattr(tracker, '_hardware', None):
        print("energy: not measured: CodeCarbon could not read this machine's hardware (run with "
              "CODECARBON_LOG_LEVEL=debug and emissions=True to see why), or set emissions=False", file=sys.stderr)
        tracker.stop()
        return None
    return tracker


def measured_parts(tracker):
    """What the tracker measures, in words."""
    parts = []
    for hardware in tracker._hardware:
        kind, mode = type(hardware).__name__, getattr(hardware, '_mode', None)
        if kind == 'CPU':
            parts.append({'intel_rapl': 'CPU by its RAPL energy counters',
                          'cpu_load': "CPU as its TDP x its load (no energy counters readable: an estimate)",
                          'constant': "CPU at a fixed share of its TDP (an estimate)"}.get(mode, f"CPU ({mode})"))
        elif kind == 'GPU':
            parts.append(f"GPU {', '.join(map(str, hardware.gpu_ids or [])) or 'all'} by NVML")
        elif kind == 'RAM':
            parts.append("RAM (an estimate from its size)")
        else:
            parts.append(hardware.description())
    return parts
