import math

import pytest
import torch

from lingmao.model.gpt import GPT, GPTConfig
from lingmao.model.mlp import MLP
from lingmao.model.moe import MoE

D, V, CTX = 32, 50, 16


def config(**kw):
    base = dict(vocab_size=V, d_model=D, n_heads=4, n_layers=2, context_length=CTX, dropout=0.0)
    return GPTConfig(**{**base, **kw})


def moe_model(**kw):
    torch.manual_seed(0)
    return GPT(config(moe_experts=4, moe_top_k=2, **kw))


def test_routing_weights_sum_to_one_over_distinct_top_experts():
    layer = MoE(config(moe_experts=5, moe_top_k=3))
    probs, gates, chosen = layer.route(torch.randn(64, D))
    torch.testing.assert_close(gates.sum(-1), torch.ones(64))
    assert (gates > 0).all() and chosen.shape == (64, 3)
    assert all(len(set(row)) == 3 for row in chosen.tolist())
    # the chosen experts are the most probable ones, weighted in proportion to their probabilities
    top = probs.topk(3, -1)
    assert torch.equal(chosen, top.indices)
    torch.testing.assert_close(gates, top.values / top.values.sum(-1, keepdim=True))


def test_one_expert_with_ample_capacity_is_the_dense_model():
    torch.manual_seed(0)
    dense = GPT(config())
    moe = GPT(config(moe_experts=1, moe_top_k=1, moe_capacity_factor=1.0))
    state = {k.replace(".mlp.", ".mlp.experts.0."): v for k, v in dense.state_dict().items()}
    state.update({k: v for k, v in moe.state_dict().items() if "router" in k})
    moe.load_state_dict(state)
    x = torch.randint(0, V, (3, CTX))
    for train in (False, True):  # train: the capacity path, with nothing dropped
        dense.train(train), moe.train(train)
        torch.testing.assert_close(moe(x), dense(x))
    assert moe.moe_stats()["dropped"].item() == 0


def test_aux_loss_falls_when_the_router_learns_to_balance():
    torch.manual_seed(0)
    layer = MoE(config(moe_experts=4, moe_top_k=1))
    bias = torch.randn(D)
    with torch.no_grad():  # a router that sends almost every token to expert 0
        layer.router.weight.zero_()
        layer.router.weight[0] = 3 * bias / bias.norm()
    x = torch.randn(128, 1, D) + bias
    target = torch.randn(128, 1, D)
    opt = torch.optim.Adam(layer.router.parameters(), lr=3e-2)
    aux = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(layer(x), target) + 0.1 * layer.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        aux.append(layer.aux_loss.item())
    assert aux[0] > 3.0  # collapsed: E = 4 is the maximum
    assert aux[-1] < 1.5  # near balance (1.0)
    assert layer.load.max().item() < 0.6


def test_overflow_is_dropped_and_counted():
    layer = MoE(config(moe_experts=4, moe_top_k=1, moe_capacity_factor=1.0))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0
    x = torch.randn(2, 10, D)
    x[..., 0] = 1.0  # every token prefers expert 0
    out = layer.train()(x)
    capacity = math.ceil(1.0 * 20 * 1 / 4)
    assert layer.dropped.item() == 20 - capacity
    assert layer.drop_rate.item() == pytest.approx((20 - capacity) / 20)
    # position-major order: the earliest positions of both sequences keep their expert
    kept = out.abs().sum(-1) > 0
    assert kept[:, : capacity // 2].all() and not kept[:, capacity // 2 + 1 :].any()
    layer.eval()(x)
    assert layer.dropped.item() == 0  # no capacity limit at eval


def test_drops_never_let_a_later_token_change_an_earlier_output():
    model = moe_model(moe_capacity_factor=0.5).train()
    x = torch.randint(0, V, (2, CTX))
    base = model(x)
    assert model.moe_stats()["dropped"].item() > 0
    for t in (4, 11):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % V
        torch.testing.assert_close(model(y)[:, :t], base[:, :t])


def test_aux_loss_is_in_the_graph_and_stats_are_reported():
    model = moe_model()
    model(torch.randint(0, V, (2, CTX)))
    stats = model.moe_stats()
    assert set(stats) == {"aux_loss", "dropped", "drop_rate", "load"}
    assert 1.0 <= stats["aux_loss"].item() <= 4.0
    torch.testing.assert_close(stats["load"].sum(), torch.tensor(1.0))
    stats["aux_loss"].backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0
    assert GPT(config()).moe_stats() == {}


def test_active_params_count_top_k_experts_and_drive_flops():
    torch.manual_seed(0)
    dense = GPT(config())
    moe = moe_model()
    expert = sum(p.numel() for p in MLP(config()).parameters())
    router = 4 * D
    assert moe.num_params() == dense.num_params() + 2 * (3 * expert + router)
    assert moe.active_params() == dense.num_params() + 2 * (1 * expert + router)
    assert dense.active_params() == dense.num_params()
    assert moe.flops_per_token() - dense.flops_per_token() == 6 * 2 * (expert + router)


def test_cached_generation_equals_uncached_for_moe():
    model = moe_model().eval()
    prompt = torch.randint(0, V, (2, 4))
    assert torch.equal(
        model.generate(prompt, 20, temperature=0), model.generate(prompt, 20, temperature=0, use_cache=False)
    )


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(moe_experts=2, moe_top_k=3), "model.moe.top_k"),
        (dict(moe_experts=-1), "model.moe.experts"),
        (dict(moe_experts=2, moe_capacity_factor=0.0), "model.moe.capacity_factor"),
    ],
)
def test_bad_moe_settings_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config(**kw)
