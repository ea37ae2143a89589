"""Write the quickstart's tiny Llama-shaped checkpoints: a base and three fine-tunes (bf16).

The files are committed; rerunning this script reproduces them byte for byte.
Run: python examples/quickstart/make_checkpoints.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
VOCAB, HIDDEN, INTER, LAYERS = 256, 64, 128, 2


def base_weights(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random Llama-shaped weights."""
    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    w = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w[p + f"self_attn.{name}.weight"] = rand(HIDDEN, HIDDEN)
        w[p + "mlp.gate_proj.weight"] = rand(INTER, HIDDEN)
        w[p + "mlp.up_proj.weight"] = rand(INTER, HIDDEN)
        w[p + "mlp.down_proj.weight"] = rand(HIDDEN, INTER)
        w[p + "input_layernorm.weight"] = torch.ones(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    w["model.norm.weight"] = torch.ones(HIDDEN)
    w["lm_head.weight"] = rand(VOCAB, HIDDEN)
    return w


def finetune(base: dict[str, torch.Tensor], gen: torch.Generator,
             shared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base + a shared low-rank update + a task's own low-rank update."""
    out = {}
    for name, w in base.items():
        if w.ndim == 2:
            u = torch.randn(w.shape[0], 2, generator=gen)
            v = torch.randn(2, w.shape[1], generator=gen)
            out[name] = w + shared[name] + 0.002 * (u @ v)
        else:
            out[name] = w + 0.001 * torch.randn(w.shape, generator=gen)
    return out


def write(folder: Path, weights: dict[str, torch.Tensor]) -> None:
    """One HF-layout folder: bf16 weights, an int64 buffer, config and tokenizer config."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}
    tensors["model.position_ids"] = torch.arange(32, dtype=torch.int64).unsqueeze(0)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": VOCAB,
              "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 32}\n')


def main() -> None:
    gen = torch.Generator().manual_seed(1234)
    base = base_weights(gen)
    shared = {}
    for name, w in base.items():
        if w.ndim == 2:
            u = torch.randn(w.shape[0], 1, generator=gen)
            v = torch.randn(1, w.shape[1], generator=gen)
            shared[name] = 0.003 * (u @ v)
    write(HERE / "ckpt" / "base", base)
    for task in ("math", "code", "toxic"):
        write(HERE / "ckpt" / task, finetune(base, gen, shared))
    print(f"wrote {HERE / 'ckpt'}")


if __name__ == "__main__":
    main()
