"""The speedrun switches: rotary positions, QK-norm, ReLU²,
a padded vocabulary, zero-initialised projections, and optim=muon."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lingmao import run
from lingmao.config import ConfigError
from lingmao.config.compose import CONF_DIR, register
from lingmao.config.rules import validate
from lingmao.model.attention import KVCache, rope_angles
from lingmao.model.attention import rotate as rope
from lingmao.model.gpt import GPT, GPTConfig
from lingmao.train import checkpoint
from lingmao.train.optim import MuonAdamW, Schedule, build_optimizer

register()
V, D, CTX = 50, 32, 16
ALL_ON = dict(rotary=True, qk_norm=True, mlp="relu2", vocab_multiple=64, zero_init_proj=True)


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    base = dict(vocab_size=V, d_model=D, n_heads=4, n_layers=2, context_length=CTX, dropout=0.0)
    return GPT(GPTConfig(**{**base, **kw}))


def batch(n=4, t=CTX, seed=1) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def loss_of(model: GPT, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def compose_cfg(*overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# --- model switches ---


@pytest.mark.parametrize(
    "switch",
    [
        dict(rotary=True),
        dict(qk_norm=True),
        dict(mlp="relu2"),
        dict(vocab_multiple=64),
        dict(zero_init_proj=True),
        ALL_ON,
        dict(ALL_ON, moe_experts=4),
    ],
)
def test_each_switch_builds_and_gives_one_logit_per_token(switch):
    model = tiny(**switch)
    logits = model(batch(2, 10))
    assert logits.shape == (2, 10, V) and torch.isfinite(logits).all()
    loss_of(model, batch()).backward()  # every switch trains
    assert all(p.grad is not None for p in model.parameters())


def test_every_model_preset_sets_the_switches_as_measured():
    # rotary on (suite=speedrun: 0.33x the baseline's steps to its val loss), the vocabulary padded
    # to 64 rows on every preset (GPU tiles; the same model on all hardware), the rest off
    for name in ("tiny", "small", "medium", "large"):
        m = compose_cfg(f"model={name}").model
        assert (m.rotary, m.qk_norm, m.mlp, m.vocab_multiple, m.zero_init_proj) == (True, False, "gelu", 64, False)
    m = compose_cfg("model=tiny", "model.rotary=false", "model.mlp=relu2").model
    assert not GPTConfig.from_model_config(m, V).rotary and GPTConfig.from_model_config(m, V).mlp == "relu2"


def test_rotary_replaces_the_learned_positions():
    model = tiny(rotary=True)
    assert model.pos_emb is None and not any("pos_emb" in n for n, _ in model.named_parameters())
    assert model.num_params() == tiny().num_params() - CTX * D
    L, d = 2, D
    # No position table to leave out of 6N: every parameter does a matmul.
    assert model.flops_per_token() == 6 * model.num_params() + 12 * L * CTX * d
    assert tiny().flops_per_token() == 6 * (tiny().num_params() - CTX * d) + 12 * L * CTX * d


def test_rotary_scores_depend_only_on_the_offset():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    cos, sin = rope_angles(GPTConfig(vocab_size=V, d_model=16, n_heads=2, context_length=64))

    def rotate(x, start):  # x's tokens at positions start, start + 1, ...
        T = x.shape[-2]
        return rope(x, cos[start : start + T], sin[start : start + T])

    scores = [rotate(q, s) @ rotate(k, s).transpose(-1, -2) for s in (0, 5, 37)]
    torch.testing.assert_close(scores[1], scores[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[2], scores[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rotate(q, 5), q)  # the vectors themselves do move

    def score(i, j):  # one query vector at position i, one key vector at position j
        return (rotate(q[..., :1, :], i) * rotate(k[..., :1, :], j)).sum()

    torch.testing.assert_close(score(2, 5), score(40, 43), atol=1e-5, rtol=1e-5)
    assert len({round(score(2, j).item(), 4) for j in range(2, 10)}) == 8  # each distance its own score


def test_rotary_attention_sees_positions_through_q_and_k():
    attn = tiny(rotary=True).blocks[0].attn
    x = torch.randn(1, 5, D)
    q0, k0, v0 = attn.heads(x, 0)
    q7, k7, v7 = attn.heads(x, 7)
    torch.testing.assert_close(q0 @ k0.transpose(-1, -2), q7 @ k7.transpose(-1, -2), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(q0, q7) and torch.equal(v0, v7)


def test_rotary_cached_greedy_equals_uncached_token_for_token_past_the_context():
    model = tiny(rotary=True, qk_norm=True).eval()
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(3))
    cached = model.generate(prompt, 30, temperature=0, use_cache=True)  # slides past context_length=16
    uncached = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert cached.shape == (2, 35) and torch.equal(cached, uncached)


def test_rotary_cached_logits_match_a_full_forward():
    model = tiny(rotary=True).eval()
    x = batch(2, 12)
    cache = KVCache(model.config, 2, x.device, torch.float32)
    steps = [model(x[:, :7], cache)] + [model(x[:, t : t + 1], cache) for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), model(x), atol=1e-5, rtol=1e-5)


def test_qk_norm_gives_unit_rms_queries_and_keys_per_head():
    attn = tiny(qk_norm=True).blocks[0].attn
    q, k, v = attn.heads(torch.randn(2, 7, D) * 5)
    for t in (q, k):
        rms = t.pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(v.pow(2).mean(-1).sqrt(), torch.ones(()))  # values are left alone
    assert tiny().blocks[0].attn.q_norm is None


def test_relu2_is_relu_squared_and_differs_from_gelu():
    gelu, relu2 = tiny(), tiny(mlp="relu2")
    relu2.load_state_dict(gelu.state_dict())  # same shapes, same weights: only the activation differs
    x = batch(2, 10)
    assert not torch.allclose(gelu(x), relu2(x))
    mlp = relu2.blocks[0].mlp
    h = torch.randn(3, D)
    torch.testing.assert_close(mlp.act(mlp.fc(h)), F.relu(mlp.fc(h)) ** 2)
    assert (mlp.act(torch.tensor([-2.0, -0.1])) == 0).all()


def test_relu2_reaches_the_moe_experts():
    moe = tiny(mlp="relu2", moe_experts=2).blocks[0].mlp
    assert all(e.act.__name__ == "relu2" for e in moe.experts)


def test_unknown_activation_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"model\.mlp='swish' is not valid; choose one of: gelu, relu2"):
        tiny(mlp="swish")
    with pytest.raises(ConfigError, match=r"model\.mlp='swish' is not valid; choose one of: gelu, relu2"):
        validate(compose_cfg("model=tiny", "model.mlp=swish"))
    with pytest.raises(ConfigError, match=r"model\.vocab_multiple"):
        validate(compose_cfg("model=tiny", "model.vocab_multiple=0"))
    with pytest.raises(ConfigError, match=r"model\.rotary=true needs an even head size"):
        validate(compose_cfg("model=tiny", "model.rotary=true", "model.d_model=12", "model.n_heads=4"))


def test_padded_vocabulary_rows_are_a_multiple_and_logits_stay_real():
    model = tiny(vocab_multiple=64)
    assert model.tok_emb.weight.shape == (64, D) and model.head.weight is model.tok_emb.weight
    assert tiny(vocab_size=130, vocab_multiple=64).tok_emb.weight.shape[0] == 192
    assert tiny(vocab_size=128, vocab_multiple=64).tok_emb.weight.shape[0] == 128
    assert model(batch(2, 8)).shape == (2, 8, V)
    # MFU counts useful work: the padded rows' FLOPs are not in flops_per_token.
    assert model.flops_per_token() == tiny().flops_per_token()


def test_padded_rows_never_win_and_leave_the_loss_alone():
    plain, padded = tiny(), tiny(vocab_multiple=64)
    state = plain.state_dict()
    pad = padded.state_dict()
    for key in ("tok_emb.weight", "head.weight"):
        state[key] = torch.cat([state[key], pad[key][V:]])
    padded.load_state_dict(state)
    x = batch()
    torch.testing.assert_close(loss_of(padded, x), loss_of(plain, x))
    with torch.no_grad():  # huge padded rows: unsliced, they would win every argmax
        padded.tok_emb.weight[V:] = 1e3 * torch.randn(64 - V, D, generator=torch.Generator().manual_seed(0))
    hidden = []
    padded.ln_f.register_forward_hook(lambda m, i, out: hidden.append(out))
    torch.testing.assert_close(loss_of(padded, x), loss_of(plain, x))
    assert ((hidden[0] @ padded.tok_emb.weight.T).argmax(-1) >= V).all()  # the premise
    out = padded.eval().generate(
        batch(8, 3), 12, temperature=2.0, top_k=None, generator=torch.Generator().manual_seed(0)
    )
    assert out.max() < V


def test_checkpoint_config_rebuilds_the_same_shapes():
    cfg = compose_cfg(
        "model=tiny",
        "model.context_length=16",
        "model.vocab_multiple=64",
        "model.rotary=true",
        "model.qk_norm=true",
        "model.mlp=relu2",
    )
    model = GPT(GPTConfig.from_model_config(cfg.model, V))
    saved = OmegaConf.to_container(cfg.model)  # what a checkpoint's "config" holds
    rebuilt = GPT(GPTConfig.from_model_config(saved, V))
    rebuilt.load_state_dict(model.state_dict())  # strict: the very same tensors and shapes
    assert rebuilt.tok_emb.weight.shape[0] == 64 and rebuilt.config == model.config
    x = batch(2, 8)
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))
    # A checkpoint from before the switches existed: they were off.
    old = {k: v for k, v in saved.items() if k not in ALL_ON}
    before = compose_cfg("model=tiny", "model.context_length=16", "model.rotary=false", "model.vocab_multiple=1").model
    assert GPTConfig.from_model_config(old, V) == GPTConfig.from_model_config(before, V)


def test_zero_init_projections_make_every_block_the_identity():
    model = tiny(zero_init_proj=True, moe_experts=2).eval()
    projs = [n for n, p in model.named_parameters() if n.endswith("proj.weight")]
    assert len(projs) == 2 * (1 + 2)  # per layer: attn.proj and each expert's proj
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if n.endswith("proj.weight"))
    x = batch(2, 10)
    with torch.no_grad():
        identity = model.head(model.ln_f(model.tok_emb(x) + model.pos_emb(torch.arange(10))))
    torch.testing.assert_close(model(x), identity)
    default = tiny()
    assert all(p.std() > 0 for n, p in default.named_parameters() if n.endswith("proj.weight"))


# --- optim=muon ---


def muon_of(model: GPT, lr=1e-3, muon_lr=0.02) -> MuonAdamW:
    return build_optimizer(model, lr, (0.9, 0.95), 1e-8, 0.05, False, name="muon", muon_lr=muon_lr)


@pytest.mark.parametrize("experts", [0, 2])
def test_muon_takes_the_block_matrices_and_adamw_the_rest(experts):
    model = tiny(moe_experts=experts, qk_norm=True)
    opt = muon_of(model)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = [names[id(p)] for g in opt.muon.param_groups for p in g["params"]]
    in_adamw = [names[id(p)] for g in opt.adamw.param_groups for p in g["params"]]
    assert not set(in_muon) & set(in_adamw)
    assert sorted(in_muon + in_adamw) == sorted(names.values())  # each parameter exactly once
    expected = {
        n
        for n, p in model.named_parameters()
        if p.dim() == 2 and n.startswith("blocks.") and not n.endswith("router.weight")
    }
    assert set(in_muon) == expected and len(expected) == 2 * (2 + 2 * max(1, experts))
    assert {"tok_emb.weight", "ln_f.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.q_norm.weight"} <= set(in_adamw)
    assert ("blocks.0.mlp.router.weight" in in_adamw) == bool(experts)
    assert opt.param_groups == opt.adamw.param_groups + opt.muon.param_groups
    assert all(a is b for a, b in zip(opt.param_groups, opt.adamw.param_groups + opt.muon.param_groups))


def test_muon_reduces_the_loss():
    model = tiny(**ALL_ON)
    opt = muon_of(model, lr=3e-3)
    x = batch(8)
    first = loss_of(model, x).item()
    for _ in range(15):
        loss_of(model, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert loss_of(model, x).item() < first - 0.5
    assert all(p.grad is None for p in model.parameters())


def test_muon_state_dict_resumes_the_next_step_exactly():
    model = tiny(rotary=True)
    opt = muon_of(model)
    x, y = batch(seed=1), batch(seed=2)
    for _ in range(3):
        loss_of(model, x).backward()
        opt.step()
        opt.zero_grad()
    twin = copy.deepcopy(model)
    fresh = muon_of(twin)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert fresh.muon.state[twin.blocks[0].attn.qkv.weight]["momentum_buffer"].abs().sum() > 0
    for m, o in ((model, opt), (twin, fresh)):
        loss_of(m, y).backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not optim=muon's"):
        fresh.load_state_dict(torch.optim.AdamW(twin.parameters()).state_dict())


def test_the_schedule_reaches_both_optimizers_at_their_own_rates():
    opt = muon_of(tiny(), lr=1e-3, muon_lr=0.02)
    assert [g["lr"] for g in opt.adamw.param_groups] == [1e-3, 1e-3]
    assert opt.muon.param_groups[0]["lr"] == 0.02
    factor = Schedule(1.0, 10, 100, 0.1).lr(3)
    for group in opt.param_groups:  # what the engine does every step
        group["lr"] = 1e-3 * factor * group.get("lr_ratio", 1.0)
    assert [g["lr"] for g in opt.adamw.param_groups] == [1e-3 * factor] * 2
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02 * factor)


def test_grad_scaler_drives_the_composite():
    """fp16's path: GradScaler unscales every group's gradients and steps both optimizers."""
    model, ref = tiny(), tiny()
    opt, ref_opt = muon_of(model), muon_of(ref)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = batch()
    scaler.scale(loss_of(model, x)).backward()
    scaler.unscale_(opt)
    loss_of(ref, x).backward()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    scaler.step(opt)
    scaler.update()
    ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


def test_optim_name_is_validated():
    with pytest.raises(ConfigError, match=r"optim\.name='sgd' is not valid; choose one of: adamw, muon"):
        validate(compose_cfg("optim.name=sgd"))
    with pytest.raises(ValueError, match="choose one of: adamw, muon"):
        build_optimizer(tiny(), 1e-3, (0.9, 0.95), 1e-8, 0.05, False, name="sgd")
    with pytest.raises(ConfigError, match=r"optim\.muon_momentum"):
        validate(compose_cfg("optim=muon", "optim.muon_momentum=1.5"))
    cfg = compose_cfg("optim=muon")
    validate(cfg)
    o = cfg.optim
    assert (o.name, o.muon_lr, o.muon_momentum, o.grad_clip) == ("muon", 0.02, 0.95, 1.0)


# --- end to end ---

SWITCHES = [
    "optim=muon",
    "model.rotary=true",
    "model.qk_norm=true",
    "model.mlp=relu2",
    "model.vocab_multiple=64",
    "model.zero_init_proj=true",
]
COMMON = [
    "hardware=cpu",
    "hardware.precision=fp32",
    "hardware.threads=1",
    "hardware.batch=4",
    "hardware.accumulation=1",
    "model=tiny",
    "model.context_length=32",
    "optim.lr=3e-3",
    "optim.warmup=2",
    "trainer.log_every=1",
    "trainer.eval_every=100",
    "trainer.eval_batches=1",
    "trainer.sample_tokens=4",
    "trainer.progress=false",
    "tracking.enabled=false",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=9",
    *SWITCHES,
]


@pytest.fixture
def keep_threads():
    """In-process runs set torch's thread count from the plan; give it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_all_switches_train_and_resume_exactly(tmp_path, shared_cache, keep_threads, capsys):
    full = run.execute(compose_cfg(*COMMON, "trainer.max_steps=4"), tmp_path, tmp_path / "full")
    assert full["status"] == "FINISHED" and full["step"] == 4 and math.isfinite(full["train/loss"])
    folder = tmp_path / "full" / "checkpoints"
    last = checkpoint.load(folder / "last.pt")
    assert set(last["optimizer"]) == {"adamw", "muon"} and "pos_emb.weight" not in last["model"]
    assert last["model"]["tok_emb.weight"].shape[0] % 64 == 0
    # The schedule reached both: the last step's LRs, in the ratio of Muon's LR (as set: the batch-size
    # rule is AdamW's) to AdamW's batch-scaled one.
    adamw_lr = last["optimizer"]["adamw"]["param_groups"][0]["lr"]
    muon_lr = last["optimizer"]["muon"]["param_groups"][0]["lr"]
    assert muon_lr / adamw_lr == pytest.approx(0.02 / last["plan"]["lr"])
    assert adamw_lr == pytest.approx(Schedule(last["plan"]["lr"], 2, 4, 0.1).lr(3))

    resumed = run.execute(
        compose_cfg(*COMMON, "trainer.max_steps=4", f"resume={folder / 'step00000002.pt'}"),
        tmp_path,
        tmp_path / "resumed",
    )
    assert resumed["step"] == 4
    assert f"resuming from {folder / 'step00000002.pt'} at step 2" in capsys.readouterr().out
    again = checkpoint.load(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert all(torch.equal(last["model"][k], again["model"][k]) for k in last["model"])
    a, b = last["optimizer"]["muon"]["state"], again["optimizer"]["muon"]["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i]["momentum_buffer"], b[i]["momentum_buffer"]) for i in a)
