"""mirim/emissions.py: the energy and CO2-eq of a run in log.jsonl and its summary line, summed across
resumes and processes; off, missing or failing, one line and the run goes on. Most runs use a fake tracker
with known numbers; one runs CodeCarbon itself, offline."""
import json
import os
import socket
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mirim import emissions  # noqa: E402
from test_train import data_dir, run  # noqa: E402,F401 (a fixture, and a tiny train.py run)

pytestmark = pytest.mark.usefixtures('one_thread')


def records(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


class FakeTracker:
    """Each flush adds 1 Wh and 0.5 g: the logged totals count the measurements."""
    started = 0

    def __init__(self):
        FakeTracker.started += 1
        self._total_energy = type('Energy', (), {'kWh': 0.0})()
        self._hardware = []
        self.stopped = False

    def flush(self):
        self._total_energy.kWh += 0.001
        return self._total_energy.kWh / 2

    def stop(self):
        self.stopped = True


@pytest.fixture
def fake_tracker(monkeypatch):
    made = []

    def start(country, gpu_ids):
        made.append(FakeTracker())
        return made[-1]
    monkeypatch.setattr(emissions, 'start_tracker', start)
    return made


def test_every_record_has_the_energy_and_emissions_so_far(data_dir, tmp_path, fake_tracker, capsys):
    run(data_dir, tmp_path, '--max_iters=3', '--eval_interval=3')
    logged = records(tmp_path)
    assert [r['energy_kwh'] for r in logged] == pytest.approx([0.001 * (n + 1) for n in range(len(logged))])
    assert all(r['emissions_kg'] == pytest.approx(r['energy_kwh'] / 2) for r in logged)
    assert fake_tracker[0].stopped
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith('done:')]
    assert f"energy {logged[-1]['energy_kwh']:.4g} kWh, {logged[-1]['emissions_kg'] * 1000:.3g} g CO2-eq" in done[0]


def test_the_first_record_says_what_the_run_ran_on_and_started_from(data_dir, tmp_path, fake_tracker):
    run(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2')
    first = records(tmp_path)[0]
    assert first['step'] == 0 and first['init_from'] == 'scratch' and 'threads' in first['hardware']
    assert first['emissions_location'] == 'world average'


def test_the_hardware_names_the_threads_torch_uses_of_the_machines(monkeypatch):
    monkeypatch.setattr(emissions, 'cpu_name', lambda: 'Some CPU')
    monkeypatch.setattr(emissions.os, 'cpu_count', lambda: 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 would
        assert emissions.hardware_text('cpu', 1) == 'Some CPU (1 of 8 threads)'
        assert emissions.hardware_text('cpu', 2) == 'Some CPU (1 of 8 threads, 2 processes)'
        monkeypatch.setattr(emissions.os, 'cpu_count', lambda: 1)
        assert emissions.hardware_text('cpu', 1) == 'Some CPU (1 thread)'
    finally:
        torch.set_num_threads(threads)


def test_emissions_sum_across_a_resume_counting_the_steps_trained_twice(data_dir, tmp_path, fake_tracker):
    import shutil
    run(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2')
    shutil.copy(tmp_path / 'ckpt.pt', tmp_path / 'at_2.pt')
    run(data_dir, tmp_path, '--max_iters=4', '--eval_interval=2', '--init_from=resume')
    spent = records(tmp_path)[-1]['energy_kwh']  # steps 3 and 4 were logged...
    os.replace(tmp_path / 'at_2.pt', tmp_path / 'ckpt.pt')  # ...and then lost with the checkpoint (a crash)
    run(data_dir, tmp_path, '--max_iters=4', '--eval_interval=2', '--init_from=resume')
    again = [r for r in records(tmp_path) if r['step'] > 2]
    assert [r['step'] for r in again] == [3, 4]
    assert [r['energy_kwh'] for r in again] == pytest.approx([spent + 0.001, spent + 0.002])
    assert again[0]['hardware']  # each session says what it ran on


def test_off_is_one_setting_and_starts_nothing(data_dir, tmp_path, fake_tracker):
    run(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2', '--emissions=False')
    assert not fake_tracker
    assert not any('energy_kwh' in r for r in records(tmp_path))


def test_without_codecarbon_one_line_and_the_run_goes_on(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'codecarbon', None)  # import codecarbon raises ImportError
    run(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2', '--emissions_country=BRA')
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith('energy:')]
    assert len(said) == 1 and 'codecarbon cannot be imported' in said[0] and 'Traceback' not in err
    logged = records(tmp_path)
    assert logged[-1]['step'] == 2 and not any('energy_kwh' in r for r in logged)


def test_a_tracker_that_cannot_read_the_hardware_is_one_line(data_dir, tmp_path, monkeypatch, capsys):
    import codecarbon

    class Broken:
        def __init__(self, **settings):
            pass

        def start(self):  # CodeCarbon catches its own errors and never sets a start time
            pass

        def stop(self):
            pass
    monkeypatch.setattr(codecarbon, 'OfflineEmissionsTracker', Broken)
    run(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2')
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith('energy:')]
    assert len(said) == 1 and 'could not read' in said[0]
    assert records(tmp_path)[-1]['step'] == 2


def test_an_unknown_country_is_refused_by_name(data_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path, '--max_iters=2', "--emissions_country=XYZ")
    assert "emissions_country='XYZ'" in str(e.value.code)


def test_codecarbon_offline_writes_no_file_and_opens_no_connection(data_dir, tmp_path, monkeypatch):
    """The real tracker: positive numbers, nothing written beside the run, no socket connected (even with a
    CodeCarbon config that asks for its API and Electricity Maps)."""
    connections = []
    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, 'connect', lambda self, address: (connections.append(address),
                                                                          real_connect(self, address))[1])
    monkeypatch.setenv('CODECARBON_SAVE_TO_API', 'true')
    monkeypatch.setenv('CODECARBON_CO2_SIGNAL_API_TOKEN', 'a-token')
    monkeypatch.chdir(tmp_path)
    run(data_dir, tmp_path / 'out', '--max_iters=2', '--eval_interval=2', '--emissions_country=BRA')
    logged = records(tmp_path / 'out')
    assert 0 < logged[0]['energy_kwh'] <= logged[-1]['energy_kwh'] < 0.01
    assert logged[0]['emissions_location'] == 'Brazil (BRA)'
    assert sorted(os.listdir(tmp_path)) == ['out']
    assert sorted(os.listdir(tmp_path / 'out')) == ['best.pt', 'ckpt.pt', 'config.json', 'log.jsonl']
    assert connections == []


def sum_over_processes(rank, world_size, port, results):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world_size)
    meter = emissions.Meter.__new__(emissions.Meter)  # the state totals() reads, without a run around it
    meter.world_size, meter.device = world_size, 'cpu'
    meter.before = (0.5, 0.25) if rank == 0 else (0.0, 0.0)  # rank 0 read the earlier sessions from the log
    meter.tracker = FakeTracker()  # each process the first of its node
    meter.tracker._total_energy.kWh = 0.009 * rank  # next flush: rank 0 at 0.001 kWh (0.5 g), rank 1 at 0.010 (5 g)
    results[rank] = meter.totals()
    torch.distributed.destroy_process_group()


def test_the_totals_are_summed_over_the_nodes_of_a_ddp_run():
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(sum_over_processes, args=(2, port, results), nprocs=2)
    # node 0: 0.001 kWh and 0.5 g this session; node 1: 0.010 kWh and 5 g; the run's earlier sessions: 0.5 kWh
    assert results[0] == pytest.approx((0.5 + 0.011, 0.25 + 0.0055))
