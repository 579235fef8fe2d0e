"""Peak resident memory of a few real training steps, in a fresh process.

Run as `python tests/rss_train.py '<json>'`; prints one JSON line: the peak
RSS (ru_maxrss) minus the RSS after the imports, in bytes. The step is the
engine's: forward under autocast, a token-summed fp32 cross-entropy, backward
over gradient accumulation, the total norm, clipping, fused AdamW.
"""

import json
import resource
import sys

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lingmao.model.gpt import GPT, Block, GPTConfig
from lingmao.train.optim import build_optimizer


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(cfg: dict) -> dict:
    torch.set_num_threads(cfg.get("threads", 2))
    base = rss_bytes()  # torch and lingmao imported, nothing built
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=cfg["V"],
            d_model=cfg["d"],
            n_heads=cfg["h"],
            n_layers=cfg["L"],
            context_length=cfg["T"],
            dropout=cfg.get("dropout", 0.0),
            rotary=cfg.get("rotary", True),
            qk_norm=cfg.get("qk_norm", False),
            moe_experts=cfg.get("experts", 0),
        )
    )
    if cfg.get("checkpoint"):
        # Activation checkpointing per block, as the engine will do it: each
        # block keeps its input and recomputes the rest in backward.
        plain = Block.forward
        Block.forward = lambda self, x, kv=None: checkpoint(plain, self, x, kv, use_reentrant=False)
    opt = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1, True)
    bf16 = cfg.get("precision", "fp32") == "bf16"
    B, T, V, accum = cfg["B"], cfg["T"], cfg["V"], cfg.get("accum", 2)
    for _ in range(cfg.get("steps", 2)):
        for _ in range(accum):
            x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if cfg.get("loss_chunk"):  # the plan's chunked loss: one chunk's logits at a time
                    loss = model(x, targets=y, loss_chunk=cfg["loss_chunk"]) / (y.numel() * accum)
                else:
                    logits = model(x)
            if not cfg.get("loss_chunk"):
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum") / (y.numel() * accum)
                del logits
            loss.backward()
            del loss
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), 1.0, norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_minus_base": peak - base, "base": base, "params": model.num_params()}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
