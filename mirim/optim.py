"""
The optimizers train.py, classify.py (and anything else that trains a mirim model) choose from:

    optimizer = make_optimizer(model, 'adamw', lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    optimizer = make_optimizer(model, 'muon', lr=1e-3, muon_lr=0.02, weight_decay=0.1, betas=(0.9, 0.95))

'adamw' is model.configure_optimizer (fused AdamW, decay on matrices only). 'muon' is one
torch.optim.Optimizer, `Muon`, with two kinds of parameter groups: Muon for the 2-D weight matrices
of the transformer blocks (attention and MLP projections), AdamW for everything else (token
embedding, LM head, norm gains, a classifier head). One optimizer object, so the learning-rate
schedule, gradient clipping, GradScaler, state_dict (exact resume) and DDP work as for AdamW.

Muon ("MomentUm Orthogonalized by Newton-Schulz"), as described by its authors:
  - Keller Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024),
    kellerjordan.github.io/posts/muon, and its use in github.com/KellerJordan/modded-nanogpt:
    SGD-momentum with Nesterov, whose update is replaced by the nearest semi-orthogonal matrix
    (U V^T of its SVD), computed by 5 steps of a quintic Newton-Schulz iteration with the
    coefficients (3.4445, -4.7750, 2.0315), in bf16 on a GPU; update scaled by sqrt(max(1, rows/cols)).
  - Bernstein & Newhouse, "Old Optimizer, New Norm: An Anthology" (arXiv:2409.20325): why
    orthogonalizing is steepest descent under the spectral norm.
  - Liu et al., "Muon is Scalable for LLM Training" (Moonlight, arXiv:2502.16982): decoupled
    weight decay on the Muon matrices too.
  - nanochat (github.com/karpathy/nanochat) trains with the same split: Muon for matrices, AdamW
    with their own rates for the embedding, unembedding and scalars.
Written for mirim from those descriptions. Under DDP the gradients arrive already averaged, so
every process computes the same update (simple, and cheap at mirim's sizes; nanochat and
modded-nanogpt spread the Newton-Schulz work over the ranks instead).
"""
import math

import torch
from torch.optim.adamw import adamw

OPTIMIZERS = ('adamw', 'muon')
NS_DTYPES = ('auto', 'float32', 'bfloat16')  # Newton-Schulz's dtype by name; 'auto': newton_schulz_dtype


def orthogonalize(g, steps=5, dtype=torch.float32):
    """The nearest semi-orthogonal matrix to g (U V^T of g = U S V^T), approximately: a quintic
    Newton-Schulz iteration tuned to push every singular value into ~[0.7, 1.2] in 5 steps, fast
    rather than exact (Keller Jordan's coefficients; close enough works as well for training).
    g: one matrix, or a stack of same-shape matrices (k, rows, cols), each orthogonalized on its own
    in one batched product per step: on a CPU the cost of many small products is mostly per call."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    x = x.unsqueeze(0) if x.dim() == 2 else x
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide side: X X^T is the smaller product
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # Frobenius >= spectral norm: every singular value <= 1
    if x.size(-1) <= 2 * x.size(-2) or dtype not in (torch.float32, torch.float64):
        # X <- a X + (b A + c A^2) X with A = X X^T
        for _ in range(steps):
            A = x @ x.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
            x = torch.baddbmm(x, B, x, beta=a)  # a X + B X
    else:  # over twice as wide as tall (an MLP's matrices): the same iteration on the small square
        # matrices, ~30% fewer multiplications (21% less time measured at 12 x 256 x 688). Every X_k
        # is Q_k X_0, Q_k a polynomial in X_0 X_0^T, so with A_k = X_k X_k^T and P_k = a I + b A_k +
        # c A_k^2: X_k+1 = P_k X_k, Q_k+1 = P_k Q_k, A_k+1 = P_k A_k P_k, and X_5 = Q_5 X_0. A_0 holds
        # the squares of g's singular values, so one below ~1% of the largest comes out less exact
        # than in the plain iteration (measured: up to 1e-4 off in entries of ~0.1; fp32 only, bf16
        # is too coarse for it).
        A, Q = x @ x.mT, None
        for step in range(steps):
            P = torch.baddbmm(A, A, A, beta=b, alpha=c)
            P.diagonal(dim1=-2, dim2=-1).add_(a)
            Q = P if Q is None else P @ Q
            if step < steps - 1:
                A = P @ (A @ P)
        x = Q @ x
    x = x.mT if tall else x
    return (x.squeeze(0) if g.dim() == 2 else x).to(g.dtype)


def newton_schulz_dtype(device_type):
    """bf16 where the hardware multiplies it natively (a CUDA GPU with bf16; a CPU with AVX512-BF16,
    AMX or Arm BF16, measured), else float32. bf16 is what Muon's authors iterate in, and halves the
    optimizer's cost on a CPU (the README's Muon section has the fp32 step's cost). The choice
    is stored in the optimizer's param_groups, so a resume keeps the run's."""
    if device_type == 'cuda':
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device_type == 'cpu':
        from mirim.common import cpu_bf16_slowdown
        return torch.bfloat16 if cpu_bf16_slowdown() < 1.0 else torch.float32
    return torch.float32


def muon_step(params, grads, buffers, splits, momentum, nesterov, lr, weight_decay, dtype, steps=5):
    """One Muon step on a group's matrices: momentum (Nesterov or not), orthogonalized, scaled,
    decoupled weight decay. splits[i]: the row sizes of the matrices fused into params[i] (q|k|v,
    gate|up), each orthogonalized on its own as if they were separate weights; None = the whole
    matrix. Every part is turned wide (a tall one transposed: the same U V^T, transposed) and the
    parts of one shape are orthogonalized together in one stacked call: the number of products a
    step is 15 per shape (3 a Newton-Schulz step), not 15 per matrix."""
    shapes = {}  # (rows, cols) turned wide -> [(a part of a parameter (a view), its update turned wide, scale, tall)]
    for p, grad, buffer, rows in zip(params, grads, buffers, splits):
        buffer.lerp_(grad, 1 - momentum)
        update = grad.lerp(buffer, momentum) if nesterov else buffer
        p.mul_(1 - lr * weight_decay)
        for p_part, u in zip(p.split(list(rows or [p.size(0)])), update.split(list(rows or [p.size(0)]))):
            tall = u.size(0) > u.size(1)
            # shape-aware scale: a tall matrix's orthogonal update has smaller entries; sqrt(rows/cols) evens it
            scale = math.sqrt(u.size(0) / u.size(1)) if tall else 1.0
            shapes.setdefault((min(u.shape), max(u.shape)), []).append((p_part, u.T if tall else u, scale, tall))
    for parts in shapes.values():
        orthogonal = orthogonalize(torch.stack([u for _, u, _, _ in parts]), steps=steps, dtype=dtype)
        for (p_part, _, scale, tall), o in zip(parts, orthogonal):
            p_part.add_(o.T if tall else o, alpha=-lr * scale)


class Muon(torch.optim.Optimizer):
    """Muon for groups with use_muon=True (2-D matrices), AdamW for the others. Every group has its
    own lr and weight_decay (decoupled: p -= lr * weight_decay * p). Muon groups also take momentum,
    nesterov, splits (one entry per parameter: row sizes of its fused parts, or None) and ns_dtype
    ('bfloat16' on a GPU: the Newton-Schulz products are the cost); AdamW groups betas and eps. ns_steps:
    Newton-Schulz iterations a step, the session's setting (not saved with the state)."""

    def __init__(self, groups, lr=1e-3, weight_decay=0.0, momentum=0.95, nesterov=True, betas=(0.9, 0.95),
                 eps=1e-8, ns_dtype='float32', ns_steps=5):
        self.ns_steps = ns_steps
        for group in groups:
            if group.get('use_muon'):
                group.setdefault('splits', [None] * len(group['params']))
                if any(p.dim() != 2 for p in group['params']):
                    raise ValueError("Muon groups take 2-D matrices only; put the rest in AdamW groups")
        super().__init__(groups, dict(lr=lr, weight_decay=weight_decay, use_muon=False, momentum=momentum,
                                      nesterov=nesterov, betas=betas, eps=eps, ns_dtype=ns_dtype))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group['lr'], group['weight_decay']
            if group['use_muon']:
                dtype = getattr(torch, group['ns_dtype'])
                todo = [(p, rows) for p, rows in zip(group['params'], group['splits']) if p.grad is not None]
                for p, _ in todo:
                    if not self.state[p]:
                        self.state[p]['momentum_buffer'] = torch.zeros_like(p)
                muon_step([p for p, _ in todo], [p.grad for p, _ in todo],
                          [self.state[p]['momentum_buffer'] for p, _ in todo], [rows for _, rows in todo],
                          group['momentum'], group['nesterov'], lr, wd, dtype, self.ns_steps)
                continue
            todo = [p for p in group['params'] if p.grad is not None]
            for p in todo:
                if not self.state[p]:  # the state torch's fused AdamW keeps
                    self.state[p].update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                                         exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state = [self.state[p] for p in todo]
            steps = [s['step'] for s in state]
            # torch's AdamW step: fused (one pass a tensor) where the steps live with the weights, as they
            # do on a CPU (a state loaded onto a GPU keeps them on the CPU: torch's foreach step then)
            fused = all(t.device == p.device for t, p in zip(steps, todo))
            if todo:
                adamw(todo, [p.grad for p in todo], [s['exp_avg'] for s in state],
                      [s['exp_avg_sq'] for s in state], [], steps, fused=fused or None, amsgrad=False,
                      beta1=group['betas'][0], beta2=group['betas'][1], lr=lr, weight_decay=wd, eps=group['eps'],
                      maximize=False)
        return loss


def muon_params(model):
    """{parameter: splits} for the matrices Muon trains: the 2-D weights inside model.layers (the
    attention and MLP projections), with the row sizes of their fused parts. Everything else (the
    token embedding, an untied LM head, the norm gains, anything outside the blocks) is AdamW's:
    Muon is for hidden layers, whose inputs and outputs are vectors, not token ids or logits."""
    c = model.config
    fused = {'wqkv': (c.n_head * c.head_size, c.n_kv_head * c.head_size, c.n_kv_head * c.head_size),
             'w13': (c.ffn_hidden, c.ffn_hidden)}
    found = {}
    for name, p in model.layers.named_parameters():
        if p.requires_grad and p.dim() == 2:
            found[p] = fused.get(name.split('.')[-2])
    return found


def make_optimizer(model, name, lr, weight_decay, betas, device_type, muon_lr=0.02, muon_momentum=0.95,
                   ns_dtype=None, extra_groups=(), ns_steps=5):
    """The optimizer for a mirim model (anything with .layers and .config, or a module holding one as
    .backbone). name 'adamw': model.configure_optimizer's fused AdamW. 'muon': Muon at muon_lr for
    the blocks' matrices, AdamW at lr for the rest (decay on matrices only, as with 'adamw').
    ns_dtype: Newton-Schulz's dtype (a torch dtype or its name), None or 'auto' = newton_schulz_dtype(device_type).
    extra_groups: more AdamW groups (e.g. a classifier head at its own lr). Every group records its
    peak lr as 'base_lr', so a schedule scales each one: group['lr'] = group['base_lr'] * factor."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r}: choose one of {', '.join(OPTIMIZERS)}")
    llama = getattr(model, 'backbone', model)
    if name == 'adamw' and not extra_groups:
        optimizer = llama.configure_optimizer(weight_decay, lr, betas, device_type)
    else:
        muon = muon_params(llama) if name == 'muon' else {}
        extra = {p for g in extra_groups for p in g['params']}
        rest = [p for p in model.parameters() if p.requires_grad and p not in muon and p not in extra]
        groups = [{'params': [p for p in rest if p.dim() >= 2], 'weight_decay': weight_decay, 'lr': lr},
                  {'params': [p for p in rest if p.dim() < 2], 'weight_decay': 0.0, 'lr': lr},
                  *({'weight_decay': weight_decay, **g} for g in extra_groups)]
        if muon:
            groups.append({'params': list(muon), 'splits': list(muon.values()), 'use_muon': True, 'lr': muon_lr,
                           'weight_decay': weight_decay})
        groups = [g for g in groups if g['params']]
        if name == 'adamw':
            optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ('cuda', 'cpu'))
        else:
            ns_dtype = newton_schulz_dtype(device_type) if ns_dtype in (None, 'auto') else ns_dtype
            optimizer = Muon(groups, betas=betas, momentum=muon_momentum, ns_steps=ns_steps,
                             ns_dtype=str(ns_dtype).replace('torch.', ''))
    for group in optimizer.param_groups:
        group['base_lr'] = group['lr']
    return optimizer


# -----------------------------------------------------------------------------
# the learning-rate schedule (every run: mirim/run.py)

def get_lr(step, c):
    """The learning rate for optimizer step `step` (0-based): a linear warmup to learning_rate, then
    cosine to min_lr at lr_decay_iters, or linear to min_lr (as classifiers are usually fine-tuned), or
    WSD (flat, then linear to min_lr over the last wsd_decay_fraction), or constant."""
    if step < c.warmup_iters:
        return c.learning_rate * (step + 1) / (c.warmup_iters + 1)
    end = c.lr_decay_iters or c.max_iters
    if c.lr_schedule == 'constant':
        return c.learning_rate
    if c.lr_schedule == 'wsd':
        decay_steps = max(1, round(end * c.wsd_decay_fraction))
        progress = min(1.0, max(0.0, (step - (end - decay_steps)) / decay_steps))
        return c.learning_rate - (c.learning_rate - c.min_lr) * progress
    if step >= end:
        return c.min_lr
    progress = (step - c.warmup_iters) / max(1, end - c.warmup_iters)
    if c.lr_schedule == 'linear':
        return c.learning_rate - (c.learning_rate - c.min_lr) * progress
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (c.learning_rate - c.min_lr)
