"""lingmao's GPT as a standard Hugging Face `transformers` model, with no
custom code: a rotary model is a GPT-NeoX, a learned-position model a GPT-2.

Both hold a lingmao block exactly (facts read from transformers' modeling
code): pre-norm LayerNorms with bias and eps 1e-5, biased linear layers,
attention scaled by 1/sqrt(head_dim), the tanh GELU (`gelu_pytorch_tanh` is
F.gelu(approximate="tanh"), lingmao's own call), tied embeddings. GPT-NeoX
then needs three settings that are not its defaults: the sequential residual
(`use_parallel_residual=False`: x + attn(ln1 x), then + mlp(ln2 .)), full
rotary (its default rotates a quarter of each head) and base 10000. Its
rotary is rotate_half, the pairing (i, i + head_dim/2) that lingmao's
`attention.rotate` uses, so q and k need no permutation; only the fused qkv
rows move, from lingmao's [q | k | v] (each head after head) to NeoX's
[head 0: q k v | head 1: q k v | ...]. GPT-2's Conv1D keeps lingmao's
[q | k | v] but stores weights as (in, out): transposed.

The padded vocabulary rows (model.vocab_multiple) stay, so the weights are
lingmao's as they are; the tokenizer has no token for them, and the
generation config suppresses them so that sampling never picks one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lingmao.config import ConfigError
from lingmao.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK_ID
from lingmao.model.attention import ROPE_BASE
from lingmao.model.gpt import GPT, GPTConfig

ACTIVATION = "gelu_pytorch_tanh"  # transformers' name for F.gelu(x, approximate="tanh")
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which lingmao's blocks use


class ExportError(ConfigError):
    """A model no standard architecture holds; one line naming the switch."""


def refuse_unsupported(c: GPTConfig) -> None:
    """ExportError for a switch that neither GPT-NeoX nor GPT-2 computes.
    zero_init_proj (an initialisation), dropout (off at inference), the
    vocabulary padding and mlp_ratio all map."""
    why = "no standard transformers architecture computes it without custom code"
    if c.moe_experts:
        raise ExportError(f"model.moe.experts={c.moe_experts}: a mixture of experts; {why} (export a dense model)")
    if c.qk_norm:
        raise ExportError(f"model.qk_norm=true: RMSNorm of q and k; {why} (GPT-NeoX and GPT-2 have none)")
    if c.mlp != "gelu":
        raise ExportError(f"model.mlp={c.mlp}: GPT-NeoX and GPT-2 take a GELU MLP; {why}")


def architecture(c: GPTConfig) -> str:
    """The transformers model class name lingmao's config maps to."""
    refuse_unsupported(c)
    return "GPTNeoXForCausalLM" if c.rotary else "GPT2LMHeadModel"


def hf_config(c: GPTConfig):
    """The transformers config of the model (vocab_size: the padded rows)."""
    from transformers import GPT2Config, GPTNeoXConfig

    common = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "tie_word_embeddings": True}
    if architecture(c) == "GPTNeoXForCausalLM":
        return GPTNeoXConfig(
            vocab_size=c.padded_vocab,
            hidden_size=c.d_model,
            num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads,
            intermediate_size=c.mlp_ratio * c.d_model,
            hidden_act=ACTIVATION,
            max_position_embeddings=c.context_length,
            layer_norm_eps=LAYER_NORM_EPS,
            use_parallel_residual=False,
            attention_bias=True,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE, "partial_rotary_factor": 1.0},
            architectures=["GPTNeoXForCausalLM"],
            **common,
        )
    return GPT2Config(
        vocab_size=c.padded_vocab,
        n_positions=c.context_length,
        n_embd=c.d_model,
        n_layer=c.n_layers,
        n_head=c.n_heads,
        n_inner=c.mlp_ratio * c.d_model,
        activation_function=ACTIVATION,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=LAYER_NORM_EPS,
        architectures=["GPT2LMHeadModel"],
        **common,
    )


def _neox_qkv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """lingmao's fused qkv rows [q | k | v] (each (heads, head_dim)) -> NeoX's per head [q k v]."""
    rows = t.shape[0]
    return t.reshape(3, heads, rows // (3 * heads), *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def neox_weights(model: GPT) -> dict[str, torch.Tensor]:
    """lingmao's state dict under GPT-NeoX's names (the tied head left to the embedding)."""
    sd, h = model.state_dict(), model.config.n_heads
    out = {"gpt_neox.embed_in.weight": sd["tok_emb.weight"]}
    for i in range(model.config.n_layers):
        src, dst = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}input_layernorm.{kind}"] = sd[f"{src}ln1.{kind}"]
            out[f"{dst}post_attention_layernorm.{kind}"] = sd[f"{src}ln2.{kind}"]
            out[f"{dst}attention.query_key_value.{kind}"] = _neox_qkv(sd[f"{src}attn.qkv.{kind}"], h)
            out[f"{dst}attention.dense.{kind}"] = sd[f"{src}attn.proj.{kind}"]
            out[f"{dst}mlp.dense_h_to_4h.{kind}"] = sd[f"{src}mlp.fc.{kind}"]
            out[f"{dst}mlp.dense_4h_to_h.{kind}"] = sd[f"{src}mlp.proj.{kind}"]
    out |= {f"gpt_neox.final_layer_norm.{k}": sd[f"ln_f.{k}"] for k in ("weight", "bias")}
    return out


def gpt2_weights(model: GPT) -> dict[str, torch.Tensor]:
    """lingmao's state dict under GPT-2's names; Conv1D weights are (in, out)."""
    sd = model.state_dict()
    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"]}
    pairs = {"ln1": "ln_1", "ln2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj"}
    pairs |= {"mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    for i in range(model.config.n_layers):
        for src, dst in pairs.items():
            w = sd[f"blocks.{i}.{src}.weight"]
            out[f"transformer.h.{i}.{dst}.weight"] = w if src.startswith("ln") else w.t().contiguous()
            out[f"transformer.h.{i}.{dst}.bias"] = sd[f"blocks.{i}.{src}.bias"]
    out |= {f"transformer.ln_f.{k}": sd[f"ln_f.{k}"] for k in ("weight", "bias")}
    return out


def hf_model(model: GPT):
    """The transformers model holding `model`'s weights, in eval mode. Every
    one of its parameters is set: a name left over or missing raises."""
    from transformers import AutoModelForCausalLM

    config = hf_config(model.config)
    weights = neox_weights(model) if model.config.rotary else gpt2_weights(model)
    hf = AutoModelForCausalLM.from_config(config, dtype=model.tok_emb.weight.dtype)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.eval()


def hf_tokenizer(tok, context_length: int):
    """lingmao's character tokenizer as a PreTrainedTokenizerFast. It adds no
    <bos> or <eos> to a prompt, as lingmao's generation does not."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    pad, unk, bos, eos = (SPECIALS[i] for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID))
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tok.to_str()),
        pad_token=pad,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        model_max_length=context_length,
        clean_up_tokenization_spaces=False,
    )


def generation_config(c: GPTConfig, max_new_tokens: int = 64):
    """lingmao generate's decoding defaults; the padded ids are never sampled."""
    from transformers import GenerationConfig

    padding = list(range(c.vocab_size, c.padded_vocab))
    return GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=50,
        top_p=0.95,
        repetition_penalty=1.2,
        max_new_tokens=max_new_tokens,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        suppress_tokens=padding or None,
    )


# config.json keys of GPT-NeoX's older spelling: transformers 4.x reads them
# (rope_parameters is 5.x's), and llama.cpp's convert_hf_to_gguf.py requires rotary_pct.
_LEGACY_NEOX = {"rotary_pct": 1.0, "rotary_emb_base": ROPE_BASE}


def write_folder(model: GPT, tok, out: Path, card: str) -> Path:
    """A Hugging Face model folder: config.json, model.safetensors, the
    tokenizer, generation_config.json and the model card README.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf = hf_model(model)
    hf.generation_config = generation_config(model.config)
    hf.save_pretrained(out)
    if model.config.rotary:
        path = out / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **_LEGACY_NEOX}, indent=2) + "\n")
    hf_tokenizer(tok, model.config.context_length).save_pretrained(out)
    # transformers 5 names the class TokenizersBackend, which 4.x lacks; both load PreTrainedTokenizerFast.
    path = out / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": TOKENIZER_CLASS}, indent=2) + "\n")
    (out / "README.md").write_text(card, encoding="utf-8")
    return out
