import torch

from lingmao.model.gpt import GPT, GPTConfig


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2, context_length=16, dropout=0.0, **kw))


def test_changing_a_future_token_never_changes_an_earlier_logit():
    model = tiny().eval()
    x = torch.randint(0, 50, (2, 16))
    base = model(x)
    for t in (3, 9, 15):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 50
        out = model(y)
        torch.testing.assert_close(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t], base[:, t])


def test_head_is_tied_and_counted_once():
    model = tiny()
    assert model.head.weight is model.tok_emb.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(unique.values())
    # 12 d^2 + 13 d per layer (qkv, proj, fc, proj and two LayerNorms), embeddings, final norm
    d, L = 32, 2
    assert model.num_params() == L * (12 * d * d + 13 * d) + 50 * d + 16 * d + 2 * d


def test_loss_at_init_is_near_uniform():
    model = tiny().eval()
    x = torch.randint(0, 50, (4, 16))
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5


def test_generate_extends_and_is_seeded():
    model = tiny().eval()
    x = torch.zeros(1, 3, dtype=torch.long)
    a = model.generate(x, 20, generator=torch.Generator().manual_seed(1))
    b = model.generate(x, 20, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 23) and torch.equal(a, b)


def test_too_long_input_is_refused():
    import pytest

    with pytest.raises(ValueError, match="context_length"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_gptconfig_is_checked_by_the_configs_rules():
    import pytest

    from lingmao.config import ConfigError

    for kw, message in [
        (dict(dropout=1.5), r"model\.dropout=1\.5 must be in \[0, 1\)"),
        (dict(d_model=30), r"model\.d_model=30 must be > 0 and divisible by model\.n_heads=4"),
        (dict(n_layers=0), r"model\.n_layers=0 must be > 0"),
        (dict(mlp_ratio=-1), r"model\.mlp_ratio=-1 must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            GPTConfig(**{**dict(vocab_size=50, d_model=32, n_heads=4, n_layers=2, context_length=16), **kw})


def test_every_activation_is_a_valid_model_mlp():
    from lingmao.config.rules import RULES
    from lingmao.model.mlp import ACTIVATIONS

    assert all(RULES["model.mlp"].ok(name, None) for name in ACTIVATIONS)
    assert not RULES["model.mlp"].ok("swish", None)
