"""
The whole mirim model in one file: a Llama-style decoder-only transformer.

    token embedding -> n_layer x [RMSNorm -> attention (RoPE, GQA) -> +, RMSNorm -> gated MLP -> +]
                    -> RMSNorm -> LM head (tied to the embedding or not)

The layout follows Hugging Face's LlamaForCausalLM (rotate-half RoPE, no biases, the gated MLP
down(act(gate(x)) * up(x))), so weights move 1:1 between the two (see mirim/hf.py). Two projections
are fused for speed: q, k, v are one matmul (wqkv) and gate, up are one matmul (w13).
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# the gated MLP's activation: 'silu' makes it SwiGLU, 'gelu' / 'gelu_tanh' GeGLU
ACTIVATIONS = {'silu': F.silu, 'gelu': F.gelu, 'gelu_tanh': lambda t: F.gelu(t, approximate='tanh')}


@dataclass
class LlamaConfig:
    vocab_size: int = 4096
    block_size: int = 256        # max context length (RoPE tables and KV cache are this long)
    n_layer: int = 4
    n_head: int = 8
    n_kv_head: int = 4           # grouped-query attention: each k/v head serves n_head // n_kv_head q heads
    n_embd: int = 256
    ffn_hidden: int = 688        # inner size of the gated MLP
    activation: str = 'silu'     # 'silu' = SwiGLU, 'gelu' / 'gelu_tanh' = GeGLU
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 3

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"LlamaConfig.{field}={getattr(self, field)!r}: {why}")
        for name in ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'ffn_hidden'):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if self.n_embd % self.n_head:
            bad('n_embd', f"must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            bad('n_kv_head', f"must divide n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            bad('n_head', f"head size n_embd/n_head={self.n_embd // self.n_head} must be even for RoPE")
        if self.activation not in ACTIVATIONS:
            bad('activation', f"must be one of {sorted(ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            bad('dropout', "must be in [0, 1)")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            bad('rope_theta' if self.rope_theta <= 0 else 'norm_eps', "must be positive")
        for name in ('bos_id', 'eos_id', 'pad_id'):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                bad(name, f"must be a token id below vocab_size={self.vocab_size} (or None)")

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields: {sorted(unknown)}")
        return cls(**d)


# Named shapes. The seed models' shapes come from their published config files; the test
# tests/test_model.py checks the parameter counts against the published ones.
PRESETS = {
    # TeenyTinyLlama-160m (Corrêa et al. 2024, arXiv:2401.16640), hf: nicholasKluge/TeenyTinyLlama-160m
    # config.json: LlamaForCausalLM, hidden 768, 12 layers, 12 heads (no GQA), intermediate 3072, silu,
    # vocab 32000, 2048 context, untied. Model card: 162,417,408 parameters.
    'ttl-160m': dict(vocab_size=32000, block_size=2048, n_layer=12, n_head=12, n_kv_head=12, n_embd=768,
                     ffn_hidden=3072, activation='silu', rope_theta=10000.0, norm_eps=1e-5,
                     tie_embeddings=False, bos_id=1, eos_id=2, pad_id=3),
    # TeenyTinyLlama-460m, hf: nicholasKluge/TeenyTinyLlama-460m: hidden 1024, 24 layers, 16 heads,
    # intermediate 4096, silu, vocab 32000, 2048 context, untied. Model card: 468,239,360 parameters.
    'ttl-460m': dict(vocab_size=32000, block_size=2048, n_layer=24, n_head=16, n_kv_head=16, n_embd=1024,
                     ffn_hidden=4096, activation='silu', rope_theta=10000.0, norm_eps=1e-5,
                     tie_embeddings=False, bos_id=1, eos_id=2, pad_id=3),
    # cucafera 244M (hf: pauhidalgoo/cucafera; its README lists 30 layers, width 768, 8 query / 4 kv heads,
    # vocab 65536, 2048 context, GeGLU). The rest from github.com/pauhidalgoo/cucafera src/model.py, the
    # CucaferaConfig that its src/train.py builds (commit 2b996c7): intermediate 2048, gelu with tanh,
    # rope_theta 10000, norm_eps 1e-5, tied embeddings, full causal attention in every layer. (An earlier
    # GPTConfig in that file had 32 layers, rope_theta 500000 and a 1024 sliding window; it does not match
    # the published 30 layers.) The card rounds to "244M"; this shape has 245,020,416.
    'cucafera-244m': dict(vocab_size=65536, block_size=2048, n_layer=30, n_head=8, n_kv_head=4, n_embd=768,
                          ffn_hidden=2048, activation='gelu_tanh', rope_theta=10000.0, norm_eps=1e-5,
                          tie_embeddings=True, bos_id=1, eos_id=2, pad_id=3),
    # TinyLlama-1.1B (Zhang et al. 2024, arXiv:2401.02385), hf: TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    # config.json: LlamaForCausalLM, hidden 2048, 22 layers, 32 heads, 4 kv heads, intermediate 5632, silu, vocab
    # 32000, 2048 context, rms_norm_eps 1e-5, rope_theta 10000, untied: 1,100,048,384 parameters. A model that
    # needs FSDP on 40 GB GPUs (plan.py; config/tinyllama_1b.py).
    'tinyllama-1.1b': dict(vocab_size=32000, block_size=2048, n_layer=22, n_head=32, n_kv_head=4, n_embd=2048,
                           ffn_hidden=5632, activation='silu', rope_theta=10000.0, norm_eps=1e-5,
                           tie_embeddings=False, bos_id=1, eos_id=2, pad_id=None),
    # Small shapes for laptops, CPU demos and tests (TinyStories-style sizes).
    'demo': dict(vocab_size=4096, block_size=256, n_layer=4, n_head=8, n_kv_head=4, n_embd=256,
                 ffn_hidden=688, activation='gelu_tanh', tie_embeddings=True),
    'tiny': dict(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                 ffn_hidden=172, activation='silu', tie_embeddings=True),
    'stories-15m': dict(vocab_size=8192, block_size=512, n_layer=6, n_head=6, n_kv_head=6, n_embd=384,
                        ffn_hidden=1024, activation='silu', tie_embeddings=True),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # one call; it accumulates in fp32 for bf16/fp16 inputs (on GPU a fused kernel)
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_tables(head_size, length, theta):
    """cos and sin of shape (length, head_size) in HF's rotate-half layout: each frequency appears
    once in the first half of the head and once in the second. The sin table's first half is
    negated, so apply_rope needs no negation of its own."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size))
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1).float(), torch.cat([-sin, sin], dim=-1).float()


def apply_rope(x, cos, sin):
    # HF's x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1]; the minus is in the table.
    # chunk, not two slices: the backward of a split is one cat, each slice's zero-fills all of x
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.n_kv_head, config.head_size
        self.wqkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_size, bias=False)
        self.wo = nn.Linear(config.n_head * config.head_size, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.cache_k = self.cache_v = None  # filled by Llama.setup_cache for incremental decoding

    def forward(self, x, cos, sin, mask=None, cache_pos=None):
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size
        qkv = self.wqkv(x).view(B, T, nh + 2 * nkv, hs)
        # split, not slice: the backward of a split is one cat, a slice's zero-fills the whole tensor
        qk, v = qkv.split([nh + nkv, nkv], dim=2)
        q, k = apply_rope(qk, cos, sin).split([nh, nkv], dim=2)  # rotate the q and k heads in one pass
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hs)
        if cache_pos is not None:
            # write this step's keys/values into the preallocated cache, attend over everything so far
            self.cache_k[:B, :, cache_pos:cache_pos + T] = k
            self.cache_v[:B, :, cache_pos:cache_pos + T] = v
            k, v = self.cache_k[:B, :, :cache_pos + T], self.cache_v[:B, :, :cache_pos + T]
        gqa = self.n_kv_head != self.n_head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and cache_pos is None,
                                           dropout_p=self.dropout if self.training else 0.0, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_size))


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w13 = nn.Linear(config.n_embd, 2 * config.ffn_hidden, bias=False)  # [gate; up]
        self.w2 = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)       # down
        self.activation = config.activation

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(ACTIVATIONS[self.activation](gate) * up)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.feed_forward = FeedForward(config)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask=None, cache_pos=None):
        h = self.attention(self.attention_norm(x), cos, sin, mask, cache_pos)
        x = x + (F.dropout(h, self.dropout) if self.training and self.dropout else h)
        h = self.feed_forward(self.ffn_norm(x))
        return x + (F.dropout(h, self.dropout) if self.training and self.dropout else h)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the LM head's logits x @ weight.T (x: (N, C), weight: (vocab, C))
    against targets (N,), skipping -100, without ever holding all N x vocab logits: rows go through
    in chunks, and each chunk's logit gradient (softmax - one-hot) is turned into the gradients of x
    and weight right away, in the forward pass; backward only scales them by the incoming gradient.
    This saves the full logits, their log-softmax and its gradient (three N x vocab tensors) and the
    passes over them. The idea is Liger-Kernel's fused linear cross-entropy."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows, with_grads):
        valid = targets != -100
        count = valid.sum().clamp(min=1)
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if with_grads else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if with_grads else None
        for start in range(0, x.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            xc, valid_c = x[rows], valid[rows, None]
            target_c = targets[rows, None].clamp(min=0)  # -100 -> any index; those rows are masked below
            # log_softmax is one row-wise kernel, run in place on the fresh logits (each row is read
            # whole before it is written): no second (chunk, vocab) tensor. Under autocast the
            # matmul runs in bf16/fp16.
            logp = (xc @ weight.t()).float()
            torch.log_softmax(logp, dim=-1, out=logp)
            loss_sum -= (logp.gather(1, target_c) * valid_c).sum()
            if with_grads:
                grad = logp.exp_()  # softmax, in place
                grad.scatter_add_(1, target_c, -torch.ones_like(target_c, dtype=grad.dtype))  # minus one-hot
                grad = grad.to(x.dtype)
                # masked rows must add nothing: zero them in the (chunk, C) operands, not the
                # (chunk, vocab) gradient
                grad_x[rows] = (grad @ weight) * valid_c
                if grad.dtype == grad_w.dtype and not torch.is_autocast_enabled(x.device.type):
                    grad_w.addmm_(grad.t(), xc * valid_c)  # fp32: accumulate in place, no temporary
                else:  # autocast or half weights: the matmul in low precision, the sum in fp32
                    grad_w += grad.t() @ (xc * valid_c)
        if with_grads:
            ctx.save_for_backward(grad_x, grad_w, count)
            ctx.weight_dtype = weight.dtype
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, count = ctx.saved_tensors
        scale = grad_loss / count
        return grad_x * scale, (grad_w * scale).to(ctx.weight_dtype), None, None, None


class Llama(nn.Module):
    def __init__(self, config, seed=None, zero_residual=False):
        super().__init__()
        if isinstance(config, dict):
            config = LlamaConfig.from_dict(config)
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.output = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(config.head_size, config.block_size, config.rope_theta)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.init_weights(seed, zero_residual)

    @torch.no_grad()
    def init_weights(self, seed=None, zero_residual=False):
        # normal(0, 0.02) everywhere; the projections that write into the residual stream (wo, w2)
        # get std 0.02/sqrt(2*n_layer) so the residual's variance does not grow with depth
        # (GPT-2 paper, section 2.3; nanoGPT does the same), or zeros with zero_residual (every block
        # starts as the identity, as modded-nanogpt and nanochat start theirs)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith('norm.weight'):
                p.fill_(1.0)
            else:
                residual = name.endswith(('wo.weight', 'w2.weight'))
                std = 0.0 if residual and zero_residual else residual_std if residual else 0.02
                # draw on the CPU so a seed gives the same weights on every device
                p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=generator))

    def num_params(self, non_embedding=True):
        """Parameters counted once each (a tied head is the embedding). non_embedding leaves out the
        token embedding table, as the scaling-law papers count model size."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, context=None):
        """Training FLOPs per token, counted as in the PaLM paper (appendix B) and nanoGPT: 6 per
        matmul weight (forward + backward) plus 12 * n_layer * n_embd * context for attention
        scores and values (the causal mask's skipped half is counted, as PaLM does)."""
        cfg = self.config
        matmul_params = self.num_params(non_embedding=True) + (cfg.vocab_size * cfg.n_embd if cfg.tie_embeddings else 0)
        matmul_params -= sum(p.numel() for n, p in self.named_parameters() if n.endswith('norm.weight'))
        context = context or cfg.block_size
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * context

    def estimate_mfu(self, tokens_per_second, peak_flops, context=None):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak FLOP/s."""
        return self.flops_per_token(context) * tokens_per_second / peak_flops

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type, eps=1e-8):
        # decay the matrices (embeddings, projections), not the norm gains
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
        # the fused kernel is one pass over each tensor instead of a loop of small ops per tensor
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=device_type in ('cuda', 'cpu'))

    def hidden_states(self, idx):
        """idx (B, T) -> the final (normalised) hidden states (B, T, n_embd) that the LM head reads;
        classify.py puts its own head on them."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's block_size {self.config.block_size}")
        x = self.dropout(self.tok_embeddings(idx))
        cos, sin = self.rope_cos[:T, None], self.rope_sin[:T, None]  # (T, 1, hs): broadcast over heads
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def forward(self, idx, targets=None, return_logits=True):
        """idx (B, T) token ids. Returns (logits (B, T, vocab), loss): loss is the mean cross-entropy
        over targets that are not -100 (masked fine-tuning), or None without targets.
        return_logits=False (with targets) computes the loss a chunk of rows at a time and returns
        (None, loss): the (B*T, vocab) logits never exist in full, which saves memory and time
        (README: speed notes). train.py and eval.py use it."""
        x = self.hidden_states(idx)
        if targets is not None and not return_logits:
            # 2^22 logits a chunk on the CPU was the fastest size measured (README: speed notes); the
            # GPU size is unmeasured
            chunk_rows = max(1, (2 ** 22 if x.device.type == 'cpu' else 2 ** 24) // self.config.vocab_size)
            with_grads = torch.is_grad_enabled() and (x.requires_grad or self.output.weight.requires_grad)
            loss = ChunkedCrossEntropy.apply(x.reshape(-1, x.size(-1)), self.output.weight, targets.reshape(-1),
                                             chunk_rows, with_grads)
            return None, loss
        logits = self.output(x)
        if targets is None:
            return logits, None
        # sum / count rather than mean, so a batch whose targets are all masked gives 0, not NaN
        loss_sum = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-100, reduction='sum')
        return logits, loss_sum / (targets != -100).sum().clamp(min=1)

    # ------------------------------------------------------------------ the KV cache (generate.py decodes)

    def setup_cache(self, batch_size, length, device=None, dtype=None):
        """Preallocate each layer's key/value cache: (batch, n_kv_head, length, head_size)."""
        cfg = self.config
        device = device or self.output.weight.device
        dtype = dtype or self.output.weight.dtype
        for layer in self.layers:
            shape = (batch_size, cfg.n_kv_head, length, cfg.head_size)
            layer.attention.cache_k = torch.zeros(shape, device=device, dtype=dtype)
            layer.attention.cache_v = torch.zeros(shape, device=device, dtype=dtype)

    def forward_cached(self, idx, cache_pos, left_pad=None, last_only=True):
        """Run idx (B, T) at cache positions cache_pos..cache_pos+T-1, reading and extending the KV
        cache. left_pad (B,) says how many pad tokens each row starts with (prompts of different
        lengths are left-padded): those keys are masked out and the row's positions start after them.
        Returns logits of the last position (B, vocab), or of all positions (B, T, vocab)."""
        B, T = idx.shape
        x = self.tok_embeddings(idx)
        if left_pad is None:
            cos, sin = self.rope_cos[cache_pos:cache_pos + T, None], self.rope_sin[cache_pos:cache_pos + T, None]
            # one new token sees the whole cache: no mask; a chunk needs the causal one
            mask = None if T == 1 else (torch.arange(cache_pos, cache_pos + T, device=idx.device)[:, None]
                                        >= torch.arange(cache_pos + T, device=idx.device))
        else:
            steps = torch.arange(cache_pos, cache_pos + T, device=idx.device)
            positions = (steps[None, :] - left_pad[:, None]).clamp(min=0)          # (B, T)
            cos, sin = self.rope_cos[positions][:, :, None], self.rope_sin[positions][:, :, None]
            keys = torch.arange(cache_pos + T, device=idx.device)
            mask = (keys[None, None, :] <= steps[None, :, None]) & (keys[None, None, :] >= left_pad[:, None, None])
            mask = mask[:, None]                                                   # (B, 1, T, keys)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache_pos)
        x = self.norm(x[:, -1] if last_only else x)
        return self.output(x)

    def release_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None


def depth_shape(depth):
    """The shape model='auto' builds from one number, its depth (nanochat's dial): width 64 per layer
    (nanochat's aspect ratio), heads of 64, half as many kv heads (GQA, when the head count is even),
    SwiGLU at 8/3 of the width (Llama's ratio) rounded up to a multiple of 64, tied embeddings (at
    these sizes the embedding is a large share of the weights), and a context that grows with the
    model. -> LlamaConfig fields (the vocab comes from the data)."""
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth={depth!r}: model='auto' needs depth = a positive integer (layers)")
    n_embd = 64 * depth
    n_head = n_embd // 64
    return dict(n_layer=depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_head // 2 if n_head % 2 == 0 else n_head,
                ffn_hidden=-(-8 * n_embd // 3 // 64) * 64, activation='silu', tie_embeddings=True,
                block_size=2048 if depth >= 12 else 512 if depth >= 6 else 256)


def config_from_preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})
