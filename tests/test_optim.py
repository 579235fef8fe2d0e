import pytest

from lingmao.model.gpt import GPT, GPTConfig
from lingmao.plan.lr import scaled_lr
from lingmao.train.optim import Schedule, param_groups, warmup_steps


def test_sqrt_scaling_matches_seed_000_example():
    # square-root scaling: 5e-5 at batch 16 -> about 1e-4 at batch 64
    assert scaled_lr(5e-5, 16, 64, "sqrt") == pytest.approx(1e-4)
    assert scaled_lr(5e-5, 16, 64, "linear") == pytest.approx(2e-4)
    assert scaled_lr(5e-5, 16, 64, "none") == 5e-5


def test_schedule_warms_up_then_decays_to_the_floor():
    total, warm = 1000, warmup_steps(0.1, 1000)
    assert warm == 100
    schedule = Schedule(1.0, warm, total, 0.1)
    f = [schedule.lr(s) for s in range(total + 1)]
    assert f[0] == pytest.approx(0.01) and f[99] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:100], f[1:100]))
    assert all(a > b for a, b in zip(f[100:], f[101:]))  # decays at every step: never flat at the floor
    assert f[total] == pytest.approx(0.1) and f[total - 1] > 0.1  # the floor at the last step, not before
    assert f[100 + 450] == pytest.approx(0.1 + 0.9 * 0.5, abs=0.01)  # floor + (1 - floor) * cos at half-way


def test_a_run_bounded_by_time_decays_by_time():
    s = Schedule.for_run(1.0, 0.1, None, 0.1, max_time=1800.0)
    assert s.lr(0, seconds=0.0) < 0.01 and s.lr(500, seconds=90.0) == pytest.approx(0.5)
    assert s.lr(900, seconds=180.0) == pytest.approx(1.0)
    assert s.lr(5000, seconds=990.0) == pytest.approx(0.55)
    assert s.lr(9000, seconds=1800.0) == pytest.approx(0.1)
    by_time = [s.lr(10**6, seconds=t) for t in range(180, 1801, 60)]
    assert all(a > b for a, b in zip(by_time, by_time[1:]))
    steps = Schedule.for_run(1.0, 0.1, 1000, 0.1)  # with a step budget the clock plays no part
    assert steps.lr(550, seconds=5.0) == steps.lr(550, seconds=5000.0) == pytest.approx(0.55, abs=0.01)


def test_with_a_step_and_a_time_bound_the_lr_follows_whichever_ends_the_run():
    s = Schedule.for_run(1.0, 0.1, 1000, 0.1, max_time=1800.0)
    # a slow machine: 110 steps in 30 minutes. Warmup ends at 180 s (step 11), not at step 100,
    # and the LR is at the floor at 1800 s though the step budget is far off
    assert s.lr(11, seconds=180.0) == pytest.approx(1.0, abs=1e-3)
    assert s.lr(55, seconds=990.0) == pytest.approx(0.55, abs=0.01)
    assert s.lr(110, seconds=1800.0) == pytest.approx(0.1)
    # a fast machine: 1000 steps in 3 minutes. Warmup by steps, the floor at step 1000
    assert s.lr(99, seconds=18.0) == pytest.approx(1.0)
    assert s.lr(1000, seconds=180.0) == pytest.approx(0.1)
    slow = [s.lr(k, seconds=k * 1800 / 110) for k in range(11, 111)]
    assert all(a > b for a, b in zip(slow, slow[1:]))


def test_warmup_as_step_count():
    assert warmup_steps(2000, 110400) == 2000


def test_no_decay_on_norms_biases_and_embeddings():
    model = GPT(GPTConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=1, context_length=8))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc.weight",
        "blocks.0.mlp.proj.weight",
    }
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_muon_keeps_its_lr_while_adamw_is_batch_scaled():
    from types import SimpleNamespace

    from lingmao.config.schema import OptimConfig
    from lingmao.train.optim import make_optimizer

    model = GPT(GPTConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=1, context_length=8))
    o = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02)
    plan = SimpleNamespace(  # t4x2's batch
        lr=scaled_lr(1e-3, 16, 256, "sqrt"), base_lr=1e-3, fused_optimizer=False, muon_ns_dtype="bf16"
    )
    opt = make_optimizer(model, o, plan)
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(4e-3)
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02)  # not 0.08


def test_the_loss_scaler_steps_muon_and_adamw_and_skips_a_step_with_an_inf_gradient():
    # fp16 presets (t4x2, rtx3060) train the default optimizer through GradScaler
    import torch

    from lingmao.train.optim import build_optimizer

    model = GPT(GPTConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=1, context_length=8, dropout=0.0))
    opt = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.0, False, name="muon")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randint(0, 20, (2, 8))

    def step(poison: bool) -> int:
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        scaler.scale(model(x, targets=x)).backward()
        if poison:
            model.blocks[0].attn.qkv.weight.grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        return sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    assert step(poison=False) == len(list(model.parameters()))  # Muon's matrices and AdamW's rest all moved
    assert step(poison=True) == 0 and scaler.get_scale() == 2.0**9  # skipped, the scale backed off


def _muon_pair(seed=0):
    import torch

    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(rows, cols)) for rows, cols in ((24, 8), (8, 24), (16, 16))]


def test_muon_in_bf16_is_torchs_muon_to_the_bit():
    """The Newton-Schulz dtype is ours to choose; in bf16 the step is torch.optim.Muon's."""
    import torch

    from lingmao.train.optim import Muon

    ours, theirs = _muon_pair(), _muon_pair()
    kw = dict(lr=0.02, weight_decay=0.01, momentum=0.95, nesterov=True, ns_steps=5, adjust_lr_fn="original")
    a, b = Muon(ours, ns_dtype=torch.bfloat16, **kw), torch.optim.Muon(theirs, **kw)
    for step in range(3):
        torch.manual_seed(10 + step)
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    assert a.state_dict()["param_groups"] == b.state_dict()["param_groups"]  # checkpoints read alike


def test_fp16_newton_schulz_keeps_a_clipped_gradients_tiny_entries():
    """Cast to fp16 before scaling, entries of 1e-8 (a clipped gradient of a
    large matrix) would flush to zero; scaled first in fp32 they do not."""
    import torch

    from lingmao.train.optim import MUON_NS_STEPS, newton_schulz

    torch.manual_seed(0)
    g = torch.randn(64, 32) * 1e-8
    coefficients = (3.4445, -4.7750, 2.0315)
    exact = newton_schulz(g, coefficients, MUON_NS_STEPS, 1e-7, torch.float32)
    half = newton_schulz(g, coefficients, MUON_NS_STEPS, 1e-7, torch.float16)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert torch.allclose(half.float(), exact, atol=2e-2)
    assert exact.abs().max() > 0.1  # orthogonalised: of order 1, whatever the gradient's scale


@pytest.mark.parametrize(
    "gpu, hardware, dtype",
    [
        (("Tesla T4", 15.0, 7.5), "auto", "fp16"),  # Turing: fp16 tensor cores, no bf16 ones
        (("Tesla V100-SXM2-32GB", 31.7, 7.0), "auto", "fp16"),
        (("Tesla P100-PCIE-16GB", 15.9, 6.0), "auto", "fp32"),  # Pascal: no tensor cores
        (("NVIDIA A100-SXM4-80GB", 80.0, 8.0), "auto", "bf16"),
        (("NVIDIA H200", 140.4, 9.0), "auto", "bf16"),
        (None, "cpu", "bf16"),
    ],
)
def test_the_newton_schulz_dtype_follows_the_devices_capability(gpu, hardware, dtype):
    import torch
    from test_config import make

    from lingmao.plan.machine import Gpu, Machine
    from lingmao.plan.make import make_plan
    from lingmao.train.optim import make_optimizer

    machine = Machine(cores=4, ram_gb=32, gpus=(Gpu(*gpu),) if gpu else ())
    plan = make_plan(make(f"hardware={hardware}", "model=tiny"), machine)
    assert plan.muon_ns_dtype == dtype
    assert make_plan(make(f"hardware={hardware}", "model=tiny", "optim=adamw"), machine).muon_ns_dtype is None

    model = GPT(GPTConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=1, context_length=8))
    opt = make_optimizer(model, make("model=tiny").optim, plan)
    seen = set()

    class Matmuls(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.addmm, torch.Tensor.__matmul__, torch.matmul):
                seen.add(args[1].dtype)
            return func(*args, **(kwargs or {}))

    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with Matmuls():
        opt.muon.step()
    assert seen == {{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]}
