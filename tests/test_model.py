import math

import pytest
import torch
import torch.nn.functional as F

from mirim.generate import generate, sample_next, vector_layout
from conftest import tiny_config, tiny_model
from model import Llama, LlamaConfig, PRESETS, config_from_preset


# ---------------------------------------------------------------- presets and config

@pytest.mark.parametrize('name, published', [
    ('ttl-160m', 162_417_408),   # TeenyTinyLlama-160m model card
    ('ttl-460m', 468_239_360),   # TeenyTinyLlama-460m model card
    ('cucafera-244m', 245_020_416),  # card says "244M": the count of its published shape (see model.py)
])
def test_preset_parameter_count_equals_published(name, published):
    with torch.device('meta'):
        model = Llama(config_from_preset(name))
    assert model.num_params(non_embedding=False) == published


def test_cucafera_count_rounds_to_card_figure():
    with torch.device('meta'):
        model = Llama(config_from_preset('cucafera-244m'))
    assert abs(model.num_params(non_embedding=False) / 1e6 - 244) < 1.5


def test_presets_use_their_source_activation():
    assert PRESETS['ttl-160m']['activation'] == 'silu'
    assert PRESETS['cucafera-244m']['activation'].startswith('gelu')
    assert PRESETS['cucafera-244m']['n_kv_head'] < PRESETS['cucafera-244m']['n_head']


@pytest.mark.parametrize('overrides, field', [
    (dict(n_head=4, n_kv_head=3), 'n_kv_head'),
    (dict(n_embd=30, n_head=4), 'n_embd'),
    (dict(n_embd=36, n_head=4, n_kv_head=4), 'n_head'),  # head size 9 is odd
    (dict(block_size=0), 'block_size'),
    (dict(activation='relu'), 'activation'),
    (dict(eos_id=97), 'eos_id'),
    (dict(dropout=1.0), 'dropout'),
])
def test_bad_config_raises_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"LlamaConfig.{field}"):
        tiny_config(**overrides)


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match='unknown preset'):
        config_from_preset('gpt-5')


def test_same_seed_gives_same_weights_and_different_seed_does_not():
    a, b, c = tiny_model(seed=1), tiny_model(seed=1), tiny_model(seed=2)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.layers[0].attention.wqkv.weight, c.layers[0].attention.wqkv.weight)


def test_residual_projections_get_scaled_init():
    model = Llama(tiny_config(n_layer=8, n_embd=64, ffn_hidden=256), seed=0)
    std_wo = model.layers[0].attention.wo.weight.std().item()
    std_wqkv = model.layers[0].attention.wqkv.weight.std().item()
    assert std_wqkv == pytest.approx(0.02, rel=0.1)
    assert std_wo == pytest.approx(0.02 / math.sqrt(16), rel=0.1)


def test_tied_embeddings_share_one_tensor_and_untied_do_not():
    tied = tiny_model(tie_embeddings=True)
    assert tied.output.weight is tied.tok_embeddings.weight
    untied = tiny_model(tie_embeddings=False)
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.num_params(non_embedding=False) == tied.num_params(non_embedding=False) + 97 * 32


def test_flops_per_token_counts_six_per_matmul_weight_plus_attention():
    cfg = tiny_config()
    model = Llama(cfg)
    matmul = cfg.n_layer * (cfg.n_embd * (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_size
                            + cfg.n_head * cfg.head_size * cfg.n_embd + 3 * cfg.n_embd * cfg.ffn_hidden)
    matmul += cfg.vocab_size * cfg.n_embd
    assert model.flops_per_token() == 6 * matmul + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert model.estimate_mfu(1000, 1e12) == pytest.approx(model.flops_per_token() * 1000 / 1e12)


# ---------------------------------------------------------------- forward pass

def test_forward_returns_logits_for_every_position_without_targets():
    model = tiny_model()
    logits, loss = model(torch.randint(0, 97, (3, 10)))
    assert logits.shape == (3, 10, 97) and loss is None


def test_forward_refuses_sequence_longer_than_block_size():
    with pytest.raises(ValueError, match='block_size'):
        tiny_model()(torch.zeros(1, 33, dtype=torch.long))


def test_changing_a_token_changes_no_earlier_logits():
    model = tiny_model()
    idx = torch.randint(0, 97, (1, 20))
    changed = idx.clone()
    changed[0, 12] = (idx[0, 12] + 1) % 97
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_loss_ignores_targets_set_to_minus_100():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 8))
    targets = torch.randint(0, 97, (2, 8))
    masked = targets.clone()
    masked[:, :5] = -100
    logits, loss = model(idx, masked)
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, 97), targets[:, 5:].reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_loss_of_fully_masked_batch_is_zero_not_nan():
    _, loss = tiny_model()(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), -100))
    assert loss.item() == 0.0


def plain_multi_head_attention(attention, x, cos, sin):
    """Reference: textbook multi-head attention with an explicit causal softmax."""
    from model import apply_rope
    B, T, C = x.shape
    nh, hs = attention.n_head, attention.head_size
    q, k, v = attention.wqkv(x).split([nh * hs, nh * hs, nh * hs], dim=-1)
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float('-inf'))
    y = scores.softmax(-1) @ v
    return attention.wo(y.transpose(1, 2).reshape(B, T, C))


def test_attention_with_as_many_kv_heads_as_heads_equals_plain_multi_head_attention():
    model = tiny_model(n_kv_head=4)
    attention = model.layers[0].attention
    x = torch.randn(2, 9, 32)
    cos, sin = model.rope_cos[:9], model.rope_sin[:9]
    assert torch.allclose(attention(x, cos[:, None], sin[:, None]), plain_multi_head_attention(attention, x, cos, sin),
                          atol=1e-5)


def test_grouped_query_attention_equals_multi_head_attention_with_repeated_kv_heads():
    gqa = tiny_model(n_kv_head=2)
    mha = tiny_model(n_kv_head=4)
    hs, nh = 8, 4
    with torch.no_grad():
        for layer_gqa, layer_mha in zip(gqa.layers, mha.layers):
            q, k, v = layer_gqa.attention.wqkv.weight.split([nh * hs, 2 * hs, 2 * hs])
            repeat = lambda w: w.view(2, hs, -1).repeat_interleave(2, dim=0).reshape(nh * hs, -1)
            layer_mha.attention.wqkv.weight.copy_(torch.cat([q, repeat(k), repeat(v)]))
            layer_mha.attention.wo.weight.copy_(layer_gqa.attention.wo.weight)
            layer_mha.feed_forward.load_state_dict(layer_gqa.feed_forward.state_dict())
        mha.tok_embeddings.weight.copy_(gqa.tok_embeddings.weight)
    idx = torch.randint(0, 97, (2, 12))
    assert torch.allclose(gqa(idx)[0], mha(idx)[0], atol=1e-5)


@pytest.mark.parametrize('activation, function', [
    ('silu', F.silu), ('gelu', F.gelu), ('gelu_tanh', lambda t: F.gelu(t, approximate='tanh'))])
def test_gated_mlp_is_down_of_activation_of_gate_times_up(activation, function):
    ff = tiny_model(activation=activation).layers[0].feed_forward
    x = torch.randn(3, 32)
    gate, up = ff.w13.weight.split(48)
    assert torch.allclose(ff(x), (function(x @ gate.T) * (x @ up.T)) @ ff.w2.weight.T, atol=1e-6)


def test_rope_rotates_each_frequency_over_the_two_halves_of_the_head():
    from model import rope_tables
    cos, sin = rope_tables(8, 4, 10000.0)
    freq = 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8)
    assert torch.allclose(cos[:, :4], cos[:, 4:]) and torch.allclose(cos[1, :4], torch.cos(freq))
    assert torch.allclose(sin[:, :4], -sin[:, 4:]) and torch.allclose(sin[1, 4:], torch.sin(freq))


def test_apply_rope_is_hugging_face_rotate_half():
    from model import apply_rope, rope_tables
    cos, sin = rope_tables(8, 5, 10000.0)
    hf_sin = torch.cat([sin[:, 4:], sin[:, 4:]], dim=-1)  # HF's table: sin in both halves
    x = torch.randn(2, 5, 3, 8)
    rotate_half = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
    expected = x * cos[:, None] + rotate_half * hf_sin[:, None]
    assert torch.allclose(apply_rope(x, cos[:, None], sin[:, None]), expected, atol=1e-6)


@pytest.mark.parametrize('tied', [True, False])
def test_chunked_loss_equals_full_logits_loss_with_the_same_gradients(tied):
    from model import ChunkedCrossEntropy
    idx = torch.randint(0, 97, (3, 11))
    targets = torch.randint(0, 97, (3, 11))
    targets[0, :4] = -100
    grads = []
    for return_logits in (True, False):
        model = tiny_model(tie_embeddings=tied).train()
        logits, loss = model(idx, targets, return_logits=return_logits)
        assert (logits is None) == (not return_logits)
        (2.5 * loss).backward()  # the incoming gradient is not 1
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (full, full_grads), (chunked, chunked_grads) = grads
    assert torch.allclose(full, chunked, atol=1e-6)
    for name, grad in full_grads.items():
        assert torch.allclose(grad, chunked_grads[name], atol=1e-6), name
    # several chunks with a short last one give the same loss as one chunk
    x, weight = torch.randn(33, 32), torch.randn(97, 32)
    flat = torch.randint(0, 97, (33,))
    assert torch.allclose(ChunkedCrossEntropy.apply(x, weight, flat, 5, False),
                          F.cross_entropy(x @ weight.T, flat), atol=1e-6)


@pytest.mark.parametrize('mode', ['autocast', 'bf16 weights'])
def test_chunked_loss_in_bfloat16_matches_the_full_logits_loss(mode):
    # the fp32 path accumulates the head's gradient in place; these take the low-precision branch
    idx, targets = torch.randint(0, 97, (3, 11)), torch.randint(0, 97, (3, 11))
    results = []
    for return_logits in (True, False):
        model = tiny_model().train()
        if mode == 'bf16 weights':
            model = model.to(torch.bfloat16)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=mode == 'autocast'):
            _, loss = model(idx, targets, return_logits=return_logits)
        loss.backward()
        results.append((loss.float(), model.output.weight.grad.float()))
    (full, full_grad), (chunked, chunked_grad) = results
    assert torch.allclose(full, chunked, rtol=1e-2)
    assert (full_grad - chunked_grad).norm() < 0.05 * full_grad.norm()


def test_chunked_loss_without_gradients_and_with_every_target_masked():
    model = tiny_model()
    idx, targets = torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        assert torch.allclose(model(idx, targets)[1], model(idx, targets, return_logits=False)[1], atol=1e-6)
    model.train()
    _, loss = model(idx, torch.full((2, 8), -100), return_logits=False)
    loss.backward()
    assert loss.item() == 0.0 and model.output.weight.grad.abs().max() == 0.0


# ---------------------------------------------------------------- KV cache and generation

@pytest.mark.parametrize('prompt_length', [1, 5, 17])
def test_kv_cache_decoding_gives_full_forward_logits(prompt_length):
    model = tiny_model(n_kv_head=2)
    idx = torch.randint(0, 97, (3, prompt_length + 6))
    full, _ = model(idx)
    model.setup_cache(3, 32)
    steps = [model.forward_cached(idx[:, :prompt_length], 0, last_only=False)]
    for pos in range(prompt_length, idx.size(1)):
        steps.append(model.forward_cached(idx[:, pos:pos + 1], pos, last_only=False))
    cached = torch.cat(steps, dim=1)
    assert torch.allclose(cached, full, atol=1e-5, rtol=0)


def test_left_padded_rows_give_the_same_logits_as_unpadded_rows():
    model = tiny_model()
    short = torch.randint(4, 97, (1, 5))
    long = torch.randint(4, 97, (1, 9))
    padded = torch.cat([torch.cat([torch.full((1, 4), 3), short], 1), long])
    model.setup_cache(2, 32)
    batched = model.forward_cached(padded, 0, left_pad=torch.tensor([4, 0]))
    alone_short, _ = model(short)
    alone_long, _ = model(long)
    assert torch.allclose(batched[0], alone_short[0, -1], atol=1e-5)
    assert torch.allclose(batched[1], alone_long[0, -1], atol=1e-5)


def greedy_without_cache(model, idx, n):
    for _ in range(n):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return idx


@pytest.mark.parametrize('batch', [1, 2])  # batch 1 decodes with transposed weights on CPU
def test_greedy_generation_equals_argmax_of_full_forward_passes(batch):
    model = tiny_model()
    idx = torch.randint(0, 97, (batch, 6))
    assert torch.equal(generate(model, idx, 12, temperature=0), greedy_without_cache(model, idx, 12))


def test_generation_leaves_the_model_trainable_and_its_weights_untouched():
    # batch-1 CPU decoding stores the weights transposed while it runs and decodes in inference mode
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = generate(model, torch.randint(0, 97, (1, 5)), 6, temperature=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.is_contiguous() and not v.is_inference(), k
    model.train()
    loss = model(out[:, :-1], out[:, 1:])[1]  # generated tokens feed a training step
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_batch1_decoding_mode_gives_the_full_forward_logits_and_rms_norm():
    # vector_layout: transposed widening matrices and the 4-op RMSNorm, as batch-1 CPU generation runs
    model = tiny_model()
    idx = torch.randint(0, 97, (1, 9))
    x = torch.randn(3, 32) * torch.tensor([[1e-4], [1.0], [300.0]])  # eps matters for the first row
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    expected = F.rms_norm(x, (32,), model.norm.weight, model.config.norm_eps)
    with torch.inference_mode(), vector_layout(model):
        assert torch.allclose(model.norm(x), expected, rtol=1e-5, atol=0)
        full = model(idx)[0]  # (with the new norm weight) every position at once, same mode
        model.setup_cache(1, 9)
        logits = [model.forward_cached(idx[:, :5], 0)] + [model.forward_cached(idx[:, t:t + 1], t) for t in range(5, 9)]
    reference = model(idx)[0]  # the usual layout and F.rms_norm
    for t, step in zip(range(4, 9), logits):
        assert torch.allclose(step, reference[:, t], atol=1e-5), t
    assert torch.allclose(full, reference, atol=1e-5)
    assert torch.equal(model.norm(x), F.rms_norm(x, (32,), model.norm.weight, model.config.norm_eps))  # put back
    assert all(p.is_contiguous() for p in model.parameters())


def test_batch1_generation_uses_the_new_weights_after_every_kind_of_change():
    # batch-1 CPU generation keeps transposed copies of weights between calls: they must follow
    model = tiny_model(tie_embeddings=False)  # a tied head's sign flip would also flip the input
    idx = torch.randint(0, 97, (1, 5))
    generate(model, idx, 3, temperature=0)
    # an optimizer step, an in-place edit, a load and a swapped tensor each make the next run use
    # the new weights (each change is to the LM head, which decides the greedy tokens)
    head = model.output.weight

    def optimizer_step():
        head.grad = torch.randn_like(head)
        torch.optim.SGD([head], lr=10.0).step()

    def in_place():
        with torch.no_grad():
            head.mul_(-1)

    def load():
        model.load_state_dict({k: v.flip(0) if k == 'output.weight' else v for k, v in model.state_dict().items()})

    def new_tensor():
        head.data = torch.randn_like(head)

    for change in (optimizer_step, in_place, load, new_tensor):
        change()
        assert torch.equal(generate(model, idx, 8, temperature=0), greedy_without_cache(model, idx, 8)), change


def test_generation_past_the_context_slides_the_window_and_keeps_going():
    model = tiny_model(block_size=16)
    out = generate(model, torch.randint(0, 97, (2, 10)), 30, temperature=0)
    assert out.shape == (2, 40)


def test_top_k_1_equals_greedy():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 4))
    sampled = generate(model, idx, 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, generate(model, idx, 10, temperature=0))


def test_same_generator_seed_gives_same_samples():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 4))
    a = generate(model, idx, 15, generator=torch.Generator().manual_seed(7))
    b = generate(model, idx, 15, generator=torch.Generator().manual_seed(7))
    c = generate(model, idx, 15, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generation_stops_rows_at_eos_and_fills_them_with_eos():
    model = tiny_model()
    idx = torch.randint(4, 97, (2, 3))
    greedy = generate(model, idx, 8, temperature=0)[:, 3:]
    eos = int(greedy[0, 1])  # declare row 0's 2nd generated token to be eos
    stop = [int((row == eos).nonzero()[0]) if (row == eos).any() else None for row in greedy]
    out = generate(model, idx, 8, temperature=0, eos_id=eos)[:, 3:]
    assert out.size(1) == (8 if stop[1] is None else max(stop) + 1)
    assert torch.equal(out[0, :stop[0] + 1], greedy[0, :stop[0] + 1])
    assert (out[0, stop[0]:] == eos).all()


def test_top_p_keeps_only_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_next(logits, torch.zeros(1, 1, dtype=torch.long), top_p=0.75,
                             generator=torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.75; 2 and 3 are never drawn


def test_repetition_penalty_divides_positive_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, 1.5, 1.0]])
    seen = torch.tensor([[0]])
    assert int(sample_next(logits, seen, temperature=0)) == 0
    assert int(sample_next(logits, seen, temperature=0, repetition_penalty=1.2)) == 0   # 2/1.2 = 1.67 > 1.5
    assert int(sample_next(logits, seen, temperature=0, repetition_penalty=1.5)) == 1   # 2/1.5 = 1.33 < 1.5


def test_repetition_penalty_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[-1.0, -1.2]])
    seen = torch.tensor([[0]])
    assert int(sample_next(logits, seen, temperature=0, repetition_penalty=1.1)) == 0   # -1.1 > -1.2
    assert int(sample_next(logits, seen, temperature=0, repetition_penalty=1.5)) == 1   # -1.5 < -1.2


def test_repetition_penalty_ignores_left_padding():
    logits = torch.tensor([[2.0, 1.5, 1.0]])
    seen = torch.tensor([[0, 2]])  # token 0 is a pad position of this row
    assert int(sample_next(logits, seen, temperature=0, repetition_penalty=1.5, left_pad=torch.tensor([1]))) == 0


# ---------------------------------------------------------------- training

def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = Llama(tiny_config(), seed=0).train()
    optimizer = model.configure_optimizer(0.0, 3e-3, (0.9, 0.95), 'cpu')
    idx = torch.randint(0, 97, (4, 17))
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_optimizer_decays_matrices_but_not_norm_gains():
    model = tiny_model()
    optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), 'cpu')
    assert optimizer.defaults['fused']  # one pass per tensor on CPU too
    decay, no_decay = optimizer.param_groups
    assert decay['weight_decay'] == 0.1 and all(p.dim() == 2 for p in decay['params'])
    assert no_decay['weight_decay'] == 0.0 and all(p.dim() == 1 for p in no_decay['params'])


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_model_runs_in_half_precision(dtype):
    model = tiny_model().to(dtype)
    logits, loss = model(torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8)))
    assert logits.dtype == dtype and torch.isfinite(loss)
    assert generate(model, torch.randint(0, 97, (1, 3)), 4, temperature=0).shape == (1, 7)
