"""optim.py: Muon's orthogonalization, which tensors get Muon, and the optimizer's step and state."""
from functools import partial

import torch

from mirim import optim
from conftest import tiny_model
from mirim.optim import make_optimizer, Muon, muon_params, orthogonalize


def test_newton_schulz_gives_a_near_orthogonal_matrix_close_to_u_v_transposed():
    torch.manual_seed(0)
    for rows, cols in ((64, 32), (32, 64), (48, 48)):
        k = min(rows, cols)
        u = torch.linalg.qr(torch.randn(rows, k))[0]
        v = torch.linalg.qr(torch.randn(cols, k))[0]
        g = u @ torch.diag(torch.logspace(-1.5, 1, k)) @ v.T  # singular values spread over 300x
        for dtype in (torch.float32, torch.bfloat16):  # bf16: the dtype where the hardware has it
            o = orthogonalize(g, dtype=dtype)
            s = torch.linalg.svdvals(o)
            assert s.min() > 0.6 and s.max() < 1.25, (dtype, s)  # every direction kept, none dominant
            assert (o * (u @ v.T)).sum() / (o.norm() * (u @ v.T).norm()) > 0.95  # close to U V^T


def per_matrix_newton_schulz(g, steps=5):
    """The iteration as Muon's authors write it, one matrix at a time: the reference the batched one
    must match."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.T if g.size(0) > g.size(1) else g
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if g.size(0) > g.size(1) else x


def test_a_stack_of_matrices_is_orthogonalized_each_on_its_own_as_one_at_a_time():
    """Up to fp32 rounding where the iteration runs on X (about square matrices), and to 5e-4 where
    it runs on X X^T (over twice as wide as tall), whose small singular values it squares (on the
    demo's real gradients and momenta: 2e-5)."""
    torch.manual_seed(0)
    for shape, tolerance in (((5, 32, 48), 1e-5), ((3, 48, 32), 1e-5), ((4, 24, 24), 1e-5), ((3, 16, 44), 5e-4),
                             ((2, 44, 16), 5e-4)):
        k, rows, cols = shape
        u = torch.linalg.qr(torch.randn(k, rows, min(rows, cols)))[0]
        v = torch.linalg.qr(torch.randn(k, cols, min(rows, cols)))[0]
        spread = torch.logspace(-3, 0, min(rows, cols))  # singular values over 1000x, as in real gradients
        g = (u * spread) @ v.mT * torch.logspace(-2, 2, k).view(-1, 1, 1)  # norms apart: each its own scale
        stacked = orthogonalize(g)
        for one, o in zip(g, stacked):
            want = per_matrix_newton_schulz(one.double())
            assert (o - want).abs().max() < tolerance, (shape, (o - want).abs().max())  # entries ~0.1-0.3
            assert torch.allclose(orthogonalize(one), o, atol=1e-6)


def test_the_batched_muon_step_is_the_per_matrix_update():
    """Every matrix (and each part of a fused one) gets -lr * (U V^T of its Nesterov momentum) *
    sqrt(max(1, rows/cols)), after decoupled decay, however the parts were grouped by shape."""
    model = tiny_model(ffn_hidden=80).train()  # gate, up and down 2.5:1, orthogonalized through X X^T
    lr, wd, momentum = 0.02, 0.1, 0.9
    optimizer = make_optimizer(model, 'muon', lr=1e-3, weight_decay=wd, betas=(0.9, 0.95), device_type='cpu',
                               muon_lr=lr, muon_momentum=momentum, ns_dtype=torch.float32)
    muon = muon_params(model)
    buffers = {p: torch.zeros_like(p) for p in muon}
    for step in range(2):  # the second step has momentum from the first
        idx = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(step))
        model(idx, idx)[1].backward()
        want = {}
        for p, splits in muon.items():
            buffers[p].lerp_(p.grad, 1 - momentum)
            nesterov = p.grad.lerp(buffers[p], momentum)
            parts = [per_matrix_newton_schulz(u.double()).float() * max(1.0, u.size(0) / u.size(1)) ** 0.5
                     for u in nesterov.split(list(splits or [p.size(0)]))]
            want[p] = p.detach() * (1 - lr * wd) - lr * torch.cat(parts)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for p in muon:
            assert (p.detach() - want[p]).abs().max() < 1e-4 * lr, (p.shape, (p.detach() - want[p]).abs().max())


def test_newton_schulz_runs_in_bf16_only_where_the_hardware_has_it_and_a_resume_keeps_the_runs_choice(monkeypatch):
    from mirim import common
    monkeypatch.setattr(common, 'cpu_bf16_slowdown', lambda: 12.0)  # emulated bf16
    assert optim.newton_schulz_dtype('cpu') == torch.float32
    model = tiny_model()
    fp32 = make_optimizer(model, 'muon', lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), device_type='cpu')
    assert fp32.param_groups[-1]['ns_dtype'] == 'float32'
    monkeypatch.setattr(common, 'cpu_bf16_slowdown', lambda: 0.5)  # native bf16
    assert optim.newton_schulz_dtype('cpu') == torch.bfloat16
    assert optim.newton_schulz_dtype('mps') == torch.float32
    again = make_optimizer(model, 'muon', lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), device_type='cpu')
    assert again.param_groups[-1]['ns_dtype'] == 'bfloat16'
    again.load_state_dict(fp32.state_dict())
    assert again.param_groups[-1]['ns_dtype'] == 'float32'


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    for tied in (True, False):
        model = tiny_model(tie_embeddings=tied)
        muon = muon_params(model)
        names = {name for name, p in model.named_parameters() if p in muon}
        assert names == {f'layers.{i}.{part}.weight' for i in range(2)
                         for part in ('attention.wqkv', 'attention.wo', 'feed_forward.w13', 'feed_forward.w2')}
        c = model.config
        assert muon[model.layers[0].attention.wqkv.weight] == (c.n_head * c.head_size, c.n_kv_head * c.head_size,
                                                               c.n_kv_head * c.head_size)
        assert muon[model.layers[0].feed_forward.w13.weight] == (c.ffn_hidden, c.ffn_hidden)
        optimizer = make_optimizer(model, 'muon', lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type='cpu',
                                   muon_lr=0.02)
        assert isinstance(optimizer, Muon)
        adamw = {id(p) for g in optimizer.param_groups if not g['use_muon'] for p in g['params']}
        assert adamw | {id(p) for p in muon} == {id(p) for p in model.parameters()} and not adamw & set(map(id, muon))
        assert {id(model.tok_embeddings.weight), id(model.norm.weight), id(model.output.weight)} <= adamw
        assert [g['lr'] for g in optimizer.param_groups if g['use_muon']] == [0.02]
        assert all(g['base_lr'] == g['lr'] for g in optimizer.param_groups)
        decay = {g['weight_decay'] for g in optimizer.param_groups for p in g['params'] if p.dim() < 2}
        assert decay == {0.0}  # no decay on the norm gains


def test_a_muon_step_moves_every_matrix_by_an_orthogonal_update_and_state_round_trips():
    model = tiny_model().train()
    optimizer = make_optimizer(model, 'muon', lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), device_type='cpu',
                               muon_lr=0.02, muon_momentum=0.0)  # no momentum: the update is the gradient's
    idx = torch.randint(0, model.config.vocab_size, (8, 32))
    model(idx, idx)[1].backward()
    wo, wqkv = model.layers[0].attention.wo.weight, model.layers[0].attention.wqkv.weight
    before = {p: (p.detach().clone(), p.grad.clone()) for p in (wo, wqkv)}
    optimizer.step()
    ns = getattr(torch, optimizer.param_groups[-1]['ns_dtype'])  # bf16 on a CPU with native bf16
    orthogonalize = partial(optim.orthogonalize, dtype=ns)
    old, grad = before[wo]
    assert torch.allclose((old - wo.detach()) / 0.02, orthogonalize(grad), atol=1e-5)
    old, grad = before[wqkv]  # q, k and v orthogonalized apart; k and v are tall: scaled by sqrt(rows / cols)
    q, k, v = grad.split(muon_params(model)[wqkv])
    scale = (k.size(0) / k.size(1)) ** 0.5 if k.size(0) > k.size(1) else 1.0
    want = torch.cat([orthogonalize(q), orthogonalize(k) * scale, orthogonalize(v) * scale])
    assert torch.allclose((old - wqkv.detach()) / 0.02, want, atol=1e-5)
    state = optimizer.state_dict()
    again = make_optimizer(model, 'muon', lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), device_type='cpu')
    again.load_state_dict(state)
    assert torch.equal(again.state[wo]['momentum_buffer'], optimizer.state[wo]['momentum_buffer'])


def test_adamw_through_make_optimizer_is_the_models_fused_adamw():
    model = tiny_model()
    optimizer = make_optimizer(model, 'adamw', lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type='cpu')
    assert type(optimizer) is torch.optim.AdamW and len(optimizer.param_groups) == 2


def test_the_adamw_part_of_muon_is_torchs_adamw():
    import copy
    model = tiny_model().train()
    twin = copy.deepcopy(model)
    optimizer = make_optimizer(model, 'muon', lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), device_type='cpu',
                               muon_lr=0.0)  # the blocks stay as they are in both: the same gradients
    rest = [p for p in twin.parameters() if p not in muon_params(twin)]
    reference = torch.optim.AdamW([{'params': [p for p in rest if p.dim() >= 2], 'weight_decay': 0.1},
                                   {'params': [p for p in rest if p.dim() < 2], 'weight_decay': 0.0}],
                                  lr=1e-2, betas=(0.9, 0.95), foreach=False)  # the textbook per-tensor loop
    for step in range(3):
        idx = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(step))
        for net, opt in ((model, optimizer), (twin, reference)):
            net(idx, idx)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for name in ('tok_embeddings.weight', 'norm.weight', 'layers.1.attention_norm.weight'):
        a, b = model.get_parameter(name), twin.get_parameter(name)
        assert not torch.equal(a, tiny_model().get_parameter(name))  # it moved
        assert torch.allclose(a, b, atol=1e-6), (name, (a - b).abs().max())


def test_bench_times_a_muon_step_against_an_adamw_step_side_by_side():
    import re
    import subprocess
    import sys
    from pathlib import Path
    done = subprocess.run([sys.executable, 'bench.py', '--what=optimizer', '--vocab_size=64', '--n_layer=1',
                           '--n_embd=32', '--n_head=2', '--n_kv_head=1', '--ffn_hidden=88', '--block_size=16',
                           '--batch_size=2', '--repeats=2', '--train_steps=1', '--ns_dtype=float32'], cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = re.search(r"a Muon step takes ([\d.]+)x an AdamW step .*turns ([\d.]+)-([\d.]+)\): ([\d.]+) against "
                      r"([\d.]+) ms a step", done.stdout)
    assert found, done.stdout
    median, low, high, muon_ms, adamw_ms = map(float, found.groups())
    assert 0 < low <= median <= high and muon_ms > 0 and adamw_ms > 0
    # the Newton-Schulz products, counted by hand: q and o 32x32 (2 x 5 steps of X X^T, A^2, B X), k and v 16x32
    # (the same), gate, up and down 32x88 on X X^T (A_0, 5 A^2, 4 P Q, 4 x 2 for P A P, Q X_0)
    square, kv = 2 * 5 * 3 * 2 * 32 ** 3, 2 * 5 * 2 * (2 * 16 * 16 * 32 + 16 ** 3)
    wide = 3 * 2 * (2 * 32 * 32 * 88 + (5 + 4 + 8) * 32 ** 3)
    found = re.search(r"optimizer.step\(\) alone: Muon ([\d.]+) ms \(Newton-Schulz in float32\), AdamW ([\d.]+) ms; the Muon step's products are "
                      r"([\d.e-]+) GFLOP .* matmul runs at (\d+) GFLOP/s", done.stdout)
    assert found, done.stdout
    assert float(found.group(3)) == float(f"{(square + kv + wide) / 1e9:.3g}") and float(found.group(4)) > 0
