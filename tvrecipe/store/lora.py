"""A peft LoRA adapter read as a task vector over its base checkpoint's tensors.

For each target module the delta is ΔW = s · B·A with s = lora_alpha / r (lora_alpha / √r
with ``use_rslora``), r and lora_alpha per module from ``rank_pattern`` / ``alpha_pattern``;
transposed for ``fan_in_fan_out`` layers (GPT-2's Conv1D) and for embeddings, whose factors
peft stores the other way round. A ``modules_to_save`` tensor is a full copy of the module:
its delta is that copy minus the base. So is a layer's own weight saved beside its factors
(``.base_layer.``, as peft saves embedding layers), which peft loads over the model's: its
difference from the base is added to s·B·A (0 over the checkpoint the adapter was made on).
Every other floating tensor of the base has delta 0.

Deltas are formed one tensor (or row block) at a time, when read, in float32.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from tvrecipe.errors import InputError
from tvrecipe.store.checkpoint import Checkpoint, TensorInfo, folder_config, open_checkpoint
from tvrecipe.store.remote import RemotePath, as_path
from tvrecipe.store.writer import RowBlocks

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# What this reader refuses, by adapter_config.json key: (value that is fine, what it is).
# LoRA initialisations that move part of the base's weights into the factors (peft does it
# again when it loads the adapter): such an adapter is over the residual base, not this one.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
# (``bias`` "lora_only" and "all" are read: peft saves those biases whole, base + delta.)
_UNSUPPORTED = {"use_dora": (False, "DoRA"),
                "lora_bias": (False, "LoRA bias terms"), "use_qalora": (False, "QA-LoRA"),
                "target_parameters": (None, "LoRA on parameters"),
                "trainable_token_indices": (None, "trainable tokens"),
                "layer_replication": (None, "layer replication")}


def adapter_files(path: Path | RemotePath) -> list[Path]:
    """The files of an adapter folder (weights, config), which its content hash covers; the
    folder may be a URL.

    Raises:
        InputError: either is missing.
    """
    files = [as_path(path) / WEIGHTS_FILE, as_path(path) / CONFIG_FILE]
    pickled = as_path(path) / "adapter_model.bin"
    if files[1].is_file() and not files[0].is_file() and pickled.is_file():
        raise InputError(
            f"{path}: holds only pickled weights (adapter_model.bin); tvrecipe never unpickles "
            "files, since unpickling can run arbitrary code. Convert it once, where you trust "
            "it: python -c \"import torch; from safetensors.torch import save_file; "
            "save_file(torch.load('adapter_model.bin', weights_only=True), "
            "'adapter_model.safetensors', metadata={'format': 'pt'})\" (in the adapter "
            "folder)")
    for f in reversed(files):  # the config first: without it, it is no adapter at all
        if not f.is_file():
            raise InputError(f"{path}: no {f.name}; a `kind: lora` model is a peft adapter "
                             f"folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
    return files


@dataclass(frozen=True)
class _Factor:
    """One target module: where its factors are, its scale, and its orientation."""

    a: str               # adapter tensor names
    b: str
    scale: float
    transposed: bool     # ΔW = s·(B·A)ᵀ (fan_in_fan_out and embeddings)


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's rule: a pattern applies to a module whose name ends with it (after a dot)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", module):  # (grouped: a key with | is one pattern)
            return value
    return default


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_config(config: object, config_file: Path) -> None:
    """The fields of ``adapter_config.json`` the reader computes with: an InputError naming
    the field rather than a crash inside the arithmetic."""
    if not isinstance(config, dict):
        raise InputError(f"{config_file}: holds a JSON {type(config).__name__}, not an object; "
                         "is this peft's adapter_config.json?")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        raise InputError(f"{config_file}: lora_alpha is {config['lora_alpha']!r}; it must be a "
                         "number")
    if "r" in config and not _is_rank(config["r"]):
        raise InputError(f"{config_file}: r is {config['r']!r}; it must be a positive whole "
                         "number (the rank of the factors)")
    ranks = config.get("rank_pattern") or {}
    if not isinstance(ranks, dict) or not all(_is_rank(v) for v in ranks.values()):
        raise InputError(f"{config_file}: rank_pattern is {ranks!r}; it must map module name "
                         "patterns to positive whole numbers")
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise InputError(f"{config_file}: alpha_pattern is {patterns!r}; it must map module "
                         "name patterns to numbers")
    for key, value in patterns.items():
        if not _is_number(value):
            raise InputError(f"{config_file}: alpha_pattern[{key!r}] is {value!r}; it must be "
                             "a number")
        try:
            re.compile(key)
        except re.error as exc:
            raise InputError(f"{config_file}: alpha_pattern key {key!r} is not a regular "
                             f"expression ({exc})") from None


class LoraAdapter:
    """An opened adapter folder with the Checkpoint interface the runner reads through:
    ``tensors`` (the base's floating tensors, as float32), ``get``, ``files``, ``close``.

    Args:
        path: The adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        base: The base checkpoint (headers), whose names and shapes the deltas take.

    Raises:
        InputError: a missing or unreadable file, a variant this reader does not support, a
            module the base does not have, or factors whose product has another shape.
    """

    def __init__(self, path: Path | RemotePath, base: Checkpoint):
        self.path = as_path(path)
        self.base = base
        config_file = adapter_files(self.path)[1]
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{config_file}: unreadable ({exc})") from None
        _check_config(config, config_file)
        if config.get("peft_type", "LORA") != "LORA":
            raise InputError(f"{config_file}: peft_type {config.get('peft_type')!r}; only LoRA "
                             "adapters can be read")
        init = config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise InputError(
                f"{config_file}: init_lora_weights {init!r} takes part of the base's weights "
                "into the factors when peft loads the adapter, so the adapter is over a base "
                "peft changes, not over this one; save it again with peft's "
                "path_initial_model_for_weight_conversion (a plain LoRA of rank 2r), or merge "
                "it with peft's merge_and_unload and use the merged checkpoint")
        for key, (fine, what) in _UNSUPPORTED.items():
            value = config.get(key, fine)
            if value != fine and value not in (None, False, [], {}):
                raise InputError(f"{config_file}: {what} ({key}: {value!r}) is not supported; "
                                 "merge such an adapter with peft's merge_and_unload and use "
                                 "the merged checkpoint")
        self.adapter = open_checkpoint(self.path / WEIGHTS_FILE)
        self.files = [*self.adapter.files, config_file]
        self.factors: dict[str, _Factor] = {}
        self.saved: dict[str, str] = {}  # base tensor -> adapter tensor (modules_to_save)
        self.layers: dict[str, str] = {}  # base tensor -> adapter tensor (`.base_layer.`)
        self._map(config)
        self.tensors: dict[str, TensorInfo] = {
            t: TensorInfo(t, "F32", info.shape, info.file, info.offset, info.nbytes, info.start)
            for t, info in base.tensors.items() if info.is_floating}

    def _map(self, config: dict) -> None:
        fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        # As peft decides: by the layer's type where the base's architecture says it (a
        # GPT-2's Conv1D layers transposed, its Linear ones not), else by the config's flag.
        model_type = _model_type(self.base)
        conv1d = conv1d_layers(model_type)
        if conv1d is None and model_type is not None:  # (peft ignores the flag on a Linear)
            def conv1d(name: str) -> bool:
                return False
        rslora = bool(config.get("use_rslora"))
        names = list(self.adapter.tensors)
        modules: dict[str, dict[str, str]] = {}
        # A base stored as the bare model (the Hub's GPT-2: `h.0.…`, not `transformer.h.0.…`)
        # under an adapter made on the model with its head: the adapter's names drop the
        # first part that no base tensor starts with.
        roots = {t.split(".", 1)[0] for t in self.base.tensors}

        def bare(key: str) -> str:
            head, _, rest = key.partition(".")
            return rest if head not in roots and rest.split(".", 1)[0] in roots else key

        keys = {name: bare(name.removeprefix(_PREFIX)) for name in names}
        # Modules with a modules_to_save copy: peft saves a resized embedding's plain layer
        # beside it, which the copy stands in for.
        copied = {k.split(".modules_to_save.", 1)[0] for k in keys.values()
                  if ".modules_to_save." in k}
        for name, key in keys.items():
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                             r"(?:\.[^.]+)?(?:\.weight)?", key)
            if m and key.endswith(".bias"):
                raise InputError(f"{self.path}: tensor {name!r} is a LoRA bias term; LoRA bias "
                                 "terms are not supported (merge such an adapter with peft's "
                                 "merge_and_unload and use the merged checkpoint)")
            if m:
                if m[2] in modules.setdefault(m[1], {}):
                    raise InputError(f"{self.path}: module {m[1]!r} has two {m[2]} tensors "
                                     f"({modules[m[1]][m[2]]!r} and {name!r}); this reader takes "
                                     "one adapter per file")
                modules[m[1]][m[2]] = name
            elif ".base_layer." in key:
                # The layer's own weights, saved beside an embedding adapter: peft loads them
                # over the model's, so over another checkpoint they count too (below).
                tensor = key.replace(".base_layer.", ".")
                info = self.base.tensors.get(tensor)
                if info is None or tuple(info.shape) != tuple(self.adapter.tensors[name].shape):
                    raise InputError(f"{self.path}: saved layer {name!r} matches no tensor of "
                                     f"the base of its shape (looked for {tensor!r}); is this "
                                     "adapter for another base model?")
                self.layers[tensor] = name
            elif "lora_magnitude_vector" in key:
                raise InputError(f"{self.path}: tensor {name!r} is a DoRA magnitude; DoRA is not "
                                 "supported")
            elif ".original_module." in key:
                continue  # (the base's own module, which a modules_to_save copy stands in for)
            else:  # modules_to_save: a full copy of the module's tensor
                # (`X.modules_to_save.ADAPTER.P` or `X.modules_to_save.P`, P maybe nested:
                # the form the base has)
                forms = [re.sub(r"\.modules_to_save\.[^.]+\.", ".", key, count=1),
                         key.replace(".modules_to_save.", ".", 1)]
                tensor = next((f for f in forms if f in self.base.tensors), forms[0])
                if tensor == key and tensor.rsplit(".", 1)[0] in copied:
                    continue  # (saved beside its copy, as peft saves a resized embedding)
                if tensor not in self.base.tensors:
                    raise InputError(f"{self.path}: saved module tensor {name!r} matches no "
                                     f"tensor of the base (looked for {tensor!r}); "
                                     f"{self._absent(tensor)}")
                got, want = self.adapter.tensors[name].shape, self.base.tensors[tensor].shape
                if tuple(got) != tuple(want):
                    raise InputError(f"{self.path}: saved module tensor {name!r} has shape "
                                     f"{list(got)}, but the base's {tensor!r} is "
                                     f"{list(want)}; is this adapter for another base model?")
                if _INPUT_EMBEDDING.search(tensor) and _tied_head(self.base):
                    raise InputError(
                        f"{self.path}: saves a copy of the input embedding {tensor!r} of a "
                        "model whose output head is tied to it (the base stores no "
                        "lm_head.weight); peft unties the two, the head keeping the base's "
                        "embedding, which a task vector over the tied tensor cannot say: merge "
                        "the adapter with peft's merge_and_unload and use the merged checkpoint")
                if tensor in self.saved:
                    raise InputError(f"{self.path}: tensors {self.saved[tensor]!r} and "
                                     f"{name!r} are both saved copies of {tensor!r}; keep one "
                                     "adapter per file")
                self.saved[tensor] = name
        for module, parts in sorted(modules.items()):
            embedding = "lora_embedding_A" in parts
            a = parts.get("lora_embedding_A" if embedding else "lora_A")
            b = parts.get("lora_embedding_B" if embedding else "lora_B")
            if a is None or b is None:
                raise InputError(f"{self.path}: module {module!r} has only one of its two LoRA "
                                 "factors; the adapter file is incomplete")
            tensor = f"{module}.weight"
            info = self.base.tensors.get(tensor)
            if info is None:
                raise InputError(f"{self.path}: adapter module {module!r} has no tensor "
                                 f"{tensor!r} in the base; {self._absent(tensor)}")
            a_shape, b_shape = self.adapter.tensors[a].shape, self.adapter.tensors[b].shape
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise InputError(f"{self.path}: module {module!r} has factors of shapes "
                                 f"{list(a_shape)} and {list(b_shape)}; only linear and "
                                 "embedding layers are supported (not convolutions)")
            r = a_shape[0]
            if r == 0:
                raise InputError(f"{self.path}: module {module!r} has rank-0 factors "
                                 f"{list(a_shape)} and {list(b_shape)}; leave the module out "
                                 "of the adapter instead")
            said = _pattern_value(config.get("rank_pattern"), module, config.get("r"))
            if said is not None and said != r:
                raise InputError(f"{self.path}: module {module!r} has factors of rank {r}, but "
                                 f"adapter_config.json gives it r = {said}, which its scale "
                                 "lora_alpha / r is taken with (peft would not load it); fix "
                                 "r (or rank_pattern), or save the adapter again")
            dtypes = {self.adapter.tensors[a].dtype, self.adapter.tensors[b].dtype}
            if not all(d.startswith(("F", "BF")) for d in dtypes):
                raise InputError(f"{self.path}: module {module!r} has factors of dtype "
                                 f"{'/'.join(sorted(dtypes))}; LoRA factors are floating "
                                 "point (F16, BF16, F32, F64)")
            transposed = embedding or (conv1d(tensor) if conv1d is not None else fan_in_fan_out)
            product = (a_shape[1], b_shape[0]) if transposed else (b_shape[0], a_shape[1])
            if b_shape[1] != r or tuple(info.shape) != product:
                raise InputError(f"{self.path}: module {module!r}: factors {list(b_shape)} x "
                                 f"{list(a_shape)} give {list(product)}, but the base's "
                                 f"{tensor!r} is {list(info.shape)}; is this adapter for "
                                 "another base model?")
            alpha = _pattern_value(config.get("alpha_pattern"), module,
                                   config.get("lora_alpha", 8))
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            self.factors[tensor] = _Factor(a, b, float(scale), transposed)
        for tensor, name in self.layers.items():
            if tensor not in self.factors:  # (its layer only: a copy, as a saved module)
                self.saved.setdefault(tensor, name)
        if not self.factors and not self.saved:
            raise InputError(f"{self.path}: the adapter holds no LoRA factors (lora_A/lora_B "
                             "tensors) and no saved modules, so it changes nothing; is "
                             "adapter_model.safetensors the one peft saved?")
        both = set(self.factors) & set(self.saved)
        if both:
            raise InputError(f"{self.path}: {min(both)!r} is both a LoRA target and a saved "
                             "module")

    def _absent(self, tensor: str) -> str:
        """Why the base may lack a tensor an adapter names, as the end of an InputError."""
        if tensor == "lm_head.weight" and _tied_head(self.base):
            return ("the base ties its output head to its input embedding (it stores no "
                    "lm_head.weight), and peft unties them to adapt or save the head apart: "
                    "merge the adapter with peft's merge_and_unload and use the merged "
                    "checkpoint")
        if tensor.split(".", 1)[0] not in {t.split(".", 1)[0] for t in self.base.tensors}:
            return (f"the base has no module {tensor.rsplit('.', 1)[0]!r} at all: is this "
                    "adapter for a model with another head (a classification head over a "
                    "language model?), or for another base model?")
        return "is this adapter for another base model?"

    def covers(self, name: str) -> bool:
        """Whether the delta of tensor ``name`` may be nonzero (else it is exactly 0, and the
        runner passes None for it rather than reading or allocating anything)."""
        return name in self.factors or name in self.saved

    @property
    def covered(self) -> list[str]:
        """Base tensors whose delta is not zero by construction."""
        return sorted({*self.factors, *self.saved})

    def get(self, name: str, rows: tuple[int, int] | None = None, device=None):
        """ΔW for one base tensor (or rows ``start:stop`` of it), float32, formed on
        ``device`` (the factors are moved there, the product is computed there; default
        CPU)."""
        import torch

        from tvrecipe.ops.parallel import serial

        info = self.tensors[name]
        shape = info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])
        factor = self.factors.get(name)
        if factor is not None:
            a = self.adapter.get(factor.a).to(device=device, dtype=torch.float32)
            b = self.adapter.get(factor.b).to(device=device, dtype=torch.float32)
            # On one thread: MKL's products of thin factors give other bits on other
            # thread counts (a 704 × 8 times 8 × 26 product on 15 threads).
            with serial():
                if factor.transposed:  # ΔW = s·(B·A)ᵀ = s·Aᵀ·Bᵀ: rows of ΔW are columns of A
                    a_rows = a if rows is None else a[:, rows[0]:rows[1]]
                    delta = a_rows.t() @ b.t()
                else:
                    delta = (b if rows is None else b[rows[0]:rows[1]]) @ a
            delta = delta.mul_(factor.scale).reshape(shape)
            layer = self.layers.get(name)
            if layer is not None:  # (exactly 0 over the checkpoint the adapter was made on)
                delta += self._copy_delta(layer, name, rows, device)
            return delta
        saved = self.saved.get(name)
        if saved is not None:
            return self._copy_delta(saved, name, rows, device)
        return torch.zeros(shape, dtype=torch.float32, device=device)

    def _copy_delta(self, copy: str, name: str, rows: tuple[int, int] | None, device):
        """A copy of base tensor ``name`` saved in the adapter (tensor ``copy``), minus the
        base's, in float32."""
        import torch
        return (self.adapter.get(copy, rows).to(device=device, dtype=torch.float32)
                - self.base.get(name, rows).to(device=device, dtype=torch.float32))

    def factor_bytes(self, name: str) -> int:
        """Bytes read from disk to form tensor ``name``'s delta."""
        copy = self.layers.get(name) or self.saved.get(name)
        nbytes = (self.adapter.tensors[copy].nbytes + self.base.tensors[name].nbytes
                  if copy is not None else 0)
        factor = self.factors.get(name)
        if factor is not None:
            nbytes += self.adapter.tensors[factor.a].nbytes + self.adapter.tensors[factor.b].nbytes
        return nbytes

    def close(self) -> None:
        self.adapter.close()
        self.base.close()


# Tensor names of input embeddings: peft adapts them as embeddings (factors the other way
# round), so the adapter must say which they are.
# Tensors of nn.Embedding modules, which peft adapts with lora_embedding_A/B (a Linear's
# factors there are dropped by peft, with a warning): input, position and token-type
# embeddings under the names transformers gives them (embed_out, GPT-NeoX's head, is Linear).
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|embed_positions|embed_in|wte|wpe|shared|"
                        r"relative_attention_bias|[A-Za-z_]*embeddings?)\.weight$")
# The input embedding an output head may be tied to (T5 and BART call it ``shared``).
_INPUT_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|shared)"
                              r"\.weight$")
# The architectures (config.json ``model_type``) whose layers of these names are
# transformers' Conv1D, which stores a weight as (in, out), the transpose of a Linear's;
# peft adapts them with ``fan_in_fan_out``. (gpt_bigcode and Qwen's first models use the
# same names for plain Linear layers, so the name alone does not tell.)
_CONV1D_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
_CONV1D_LAYER = re.compile(r"(^|\.)(c_attn|q_attn|c_proj|c_fc)\.weight$")


def _config(checkpoint: Checkpoint) -> dict:
    """The config.json beside a local checkpoint; {} if none."""
    path = getattr(checkpoint, "path", None)
    if not isinstance(path, Path):
        return {}
    return folder_config(path if path.is_dir() else path.parent)


def _architecture(config: dict) -> str:
    """The model class a config.json names first (``architectures``); "" if none."""
    names = config.get("architectures")
    return names[0] if isinstance(names, list) and names and isinstance(names[0], str) else ""


def _tied_head(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint is a language model whose output head is its input embedding:
    no ``lm_head.weight`` stored, and a config.json that does not untie them."""
    config = _config(checkpoint)
    head = _architecture(config).endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM",
                                           "ForConditionalGeneration", "ForSeq2SeqLM"))
    return (head and "lm_head.weight" not in checkpoint.tensors
            and config.get("tie_word_embeddings", True) is not False)


def _model_type(checkpoint: Checkpoint) -> object:
    """The ``model_type`` in the config.json beside a local checkpoint; None if none."""
    return _config(checkpoint).get("model_type")


def bare_prefix(config: dict, names) -> str:
    """The prefix the model peft loads an adapter on gives the tensor names of a base stored
    as its bare model: ``transformer.`` for a GPT-2-like base saved without it (as the Hub's
    GPT-2 checkpoints are), else ""."""
    arch = _architecture(config)
    head = arch.endswith("LMHeadModel") or "For" in arch  # (not GPT2Model: the bare model)
    if head and config.get("model_type") in _CONV1D_TYPES and not any(
            n.startswith("transformer.") for n in names) and any(
            n.startswith("h.") for n in names):
        return "transformer."
    return ""


def conv1d_layers(model_type: object):
    """For a checkpoint of ``model_type`` (its config.json's), a test of whether a tensor
    is the weight of a Conv1D layer; None when the architecture has none."""
    if model_type not in _CONV1D_TYPES:
        return None
    return lambda name: bool(_CONV1D_LAYER.search(name))


# The model types transformers' AutoModelForSeq2SeqLM takes (an encoder-decoder such as
# Whisper's ForConditionalGeneration is not one: peft's SEQ_2_SEQ_LM breaks its forward).
_SEQ2SEQ_TYPES = frozenset({"t5", "mt5", "umt5", "longt5", "bart", "mbart", "pegasus",
                            "pegasus_x", "marian", "blenderbot", "blenderbot-small", "m2m_100",
                            "led", "plbart", "fsmt", "prophetnet", "xlm-prophetnet", "nllb-moe",
                            "bigbird_pegasus", "switch_transformers", "mvp", "bert-generation",
                            "encoder-decoder"})
# peft's task types by the head a transformers architecture names (config.json's
# ``architectures``), which AutoPeftModel picks its auto class by.
_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
               ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
               ("ForQuestionAnswering", "QUESTION_ANS"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"))


def peft_task_type(config: dict) -> str | None:
    """peft's ``task_type`` for a model of this config.json: by its architecture's head, a
    text encoder-decoder's (T5, BART, ...) SEQ_2_SEQ_LM; None when it does not tell (peft
    then loads the adapter with PeftModel, not AutoPeftModel)."""
    name = _architecture(config)
    if config.get("model_type") in _SEQ2SEQ_TYPES and name.endswith(
            ("ForConditionalGeneration", "LMHeadModel", "ForSeq2SeqLM")):
        return "SEQ_2_SEQ_LM"
    if name.endswith("ForConditionalGeneration"):
        return None  # (a vision or speech model: peft's task types fit none of them)
    return next((task for head, task in _TASK_TYPES if name.endswith(head)), None)


class AdapterError(ValueError):
    """The vector cannot be written as a peft adapter (a delta with NaN or Inf, which has no
    singular value decomposition, or no nonzero 2-D delta at all)."""


class AdapterWriter:
    """Writes a vector as a peft LoRA adapter folder, one tensor at a time.

    Each 2-D delta becomes the factors of its truncated SVD (B = U·√Σ, A = √Σ·Vᵀ, with
    ``lora_alpha`` equal to the rank so that peft's scale is 1); input embeddings become
    embedding factors. Other tensors (1-D norms and biases) cannot be LoRA targets and are
    left out: the report counts them. Row blocks of a tensor are gathered until it is whole.

    Args:
        folder: The (staging) folder to write ``adapter_config.json`` and
            ``adapter_model.safetensors`` into.
        shapes: Shape of every floating tensor, in write order.
        rank: A rank for every tensor, or None with ``energy``.
        energy: Keep, per tensor, the fewest singular values holding this share of Σσ².
        base_model: ``base_model_name_or_path`` for the config.
        task_type: peft's ``task_type`` for the config (:func:`peft_task_type`).
        metadata: safetensors header metadata (provenance).
    """

    def __init__(self, folder: Path, shapes: dict[str, tuple[int, ...]], rank,
                 energy: float | None, base_model: str | None, metadata: dict[str, str],
                 full_base: Checkpoint | None = None, dtype: str = "F32", conv1d=None,
                 task_type: str | None = None, prefix: str = ""):
        self.folder = Path(folder)
        self.conv1d = conv1d  # name -> whether it is a Conv1D weight, (in, out); or None
        self.fan_in_fan_out = False  # a Conv1D layer was adapted
        self.dtype = dtype  # the factors' (and saved tensors') stored dtype
        self.full_base = full_base  # with it, tensors that are not 2-D are saved whole
        self.full: dict[str, object] = {}
        self.shapes = shapes
        self.rank, self.energy = rank, energy
        self.base_model = base_model
        self.task_type = task_type
        self.prefix = prefix  # before each module name (a bare base under a model with a head)
        self.metadata = metadata
        self.factors: dict[str, object] = {}
        self.ranks: dict[str, int] = {}
        self.report: dict[str, dict] = {}
        self.skipped: list[str] = []
        self._blocks = RowBlocks()
        self.sha256: dict[Path, str] = {}
        self._sq_err = 0.0
        self._sq_norm = 0.0
        self._sq_left = 0.0  # of the deltas left out (the adapter does not carry them)
        self._sq_full: dict[str, float] = {}  # of each delta saved whole

    def write(self, name: str, t) -> None:
        shape = self.shapes[name]
        lora = len(shape) == 2 and min(shape) > 0
        if not lora and (self.full_base is None or name not in self.full_base.tensors):
            sq = float(t.double().square().sum())  # (a block at a time)
            if sq > 0 and name not in self.skipped:  # (a zero delta loses nothing)
                self.skipped.append(name)
            self._sq_left += sq
            return
        whole = self._blocks.add(name, t.reshape(-1, *shape[1:]), shape[0] if shape else 1)
        if whole is None:
            return
        whole = whole.reshape(shape)
        if lora:
            self._factor(name, whole)
        else:  # saved whole: base + delta
            self.full[name] = self.full_base.get(name).float() + whole.float().cpu()
            self._sq_full[name] = float(whole.double().square().sum())

    def _factor(self, name: str, delta) -> None:
        from tvrecipe.ops import all_finite, derive_seed
        from tvrecipe.ops.lowrank import lora_factors

        module = self.prefix + name.removesuffix(".weight")
        embedding = bool(_EMBEDDING.search(name))
        # peft's ΔW is B·A for a Linear, (B·A)ᵀ for an embedding and for a Conv1D layer
        # (fan_in_fan_out): factor the transpose of those.
        conv1d = not embedding and self.conv1d is not None and self.conv1d(name)
        work = delta.float().T if embedding or conv1d else delta.float()
        if not all_finite(work):
            raise AdapterError(
                f"tensor {name!r} holds NaN or Inf (let in by --allow-nonfinite?), and a "
                "low-rank adapter of it does not exist: fix the checkpoint, or write this "
                "vector with format: safetensors")
        rank = self.rank(name) if callable(self.rank) else self.rank
        b, a, err, norm = lora_factors(work, rank, self.energy, seed=derive_seed("peft", name))
        r = a.shape[0]
        self._sq_norm += norm ** 2
        self._sq_err += (err * norm) ** 2
        if norm == 0.0:  # an exact-zero delta: nothing to adapt, whatever the rank asked
            r = 0
        self.report[name] = {"rank": r, "relative_error": err}
        if r == 0:
            return
        key = f"base_model.model.{module}"
        if embedding:
            self.factors[f"{key}.lora_embedding_A"] = a.contiguous()
            self.factors[f"{key}.lora_embedding_B"] = b.contiguous()
        else:
            self.factors[f"{key}.lora_A.weight"] = a.contiguous()
            self.factors[f"{key}.lora_B.weight"] = b.contiguous()
            self.fan_in_fan_out |= conv1d
        self.ranks[module] = r

    def close(self) -> None:
        import hashlib

        import torch

        if self._blocks.pending:
            raise RuntimeError(f"incomplete tensors at close: {sorted(self._blocks.pending)}")
        if self.full_base is not None:
            self.full_base.close()
        if not self.ranks:
            raise AdapterError(
                "no 2-D tensor of this vector is nonzero (is a fine-tune equal to its base?), "
                "so the adapter would adapt no module, and peft cannot load that: write the "
                "vector with format: safetensors")
        # A module is saved whole (modules_to_save) when none of its tensors is a LoRA target;
        # a Linear's bias beside its adapted weight is saved as peft's bias "lora_only" saves
        # it (`.base_layer.bias`, base + delta: peft loads it over the model's).
        saved: dict[str, list[str]] = {}
        biases: list[str] = []  # of adapted modules
        for name in self.full:
            saved.setdefault(self.prefix + name.rsplit(".", 1)[0], []).append(name)
        for module, names in sorted(saved.items()):
            if module in self.ranks:
                for name in names:
                    if self.prefix + name == f"{module}.bias":
                        self.factors[f"base_model.model.{module}.base_layer.bias"] = \
                            self.full[name].contiguous()
                        biases.append(name)
                    elif self._sq_full[name] > 0:
                        self.skipped.append(name)
                        self._sq_left += self._sq_full[name]
                continue
            for name in names:
                self.factors[f"base_model.model.{self.prefix}{name}"] = self.full[name].contiguous()
        whole_names = [n for m in sorted(saved) if m not in self.ranks for n in saved[m]] + biases
        saved_modules = sorted(m for m in saved if m not in self.ranks)
        top = max(self.ranks.values(), default=0)
        rank = self.rank if isinstance(self.rank, int) else top
        rank = max(rank, 1)
        differs = {m: r for m, r in self.ranks.items() if r != rank}
        config = {
            "peft_type": "LORA", "base_model_name_or_path": self.base_model,
            "r": rank, "lora_alpha": rank, "target_modules": sorted(self.ranks),
            "rank_pattern": differs, "alpha_pattern": dict(differs),
            "lora_dropout": 0.0, "bias": "lora_only" if biases else "none",
            "fan_in_fan_out": self.fan_in_fan_out,
            "use_rslora": False, "use_dora": False,
            "modules_to_save": saved_modules or None,
            "init_lora_weights": True, "inference_mode": True, "task_type": self.task_type,
        }
        text = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
        (self.folder / CONFIG_FILE).write_bytes(text)
        self.sha256[self.folder / CONFIG_FILE] = hashlib.sha256(text).hexdigest()
        # tvrecipe's own writer: its header is the same bytes on every run (safetensors'
        # save_file orders the metadata of each run differently).
        from tvrecipe.store.writer import SafetensorsStreamWriter, TensorSpec
        factors = dict(sorted(self.factors.items()))
        writer = SafetensorsStreamWriter(
            self.folder / WEIGHTS_FILE,
            [TensorSpec(k, self.dtype, tuple(v.shape)) for k, v in factors.items()],
            {**self.metadata, "format": "pt"})
        for k, v in factors.items():
            writer.write(k, v.to(torch.float32))
        writer.close()
        self.sha256[writer.path] = writer.sha256
        total = (self._sq_err ** 0.5 / self._sq_norm ** 0.5) if self._sq_norm else 0.0
        whole = self._sq_norm + self._sq_left + sum(  # (and what is saved whole, exactly)
            self._sq_full[n] for n in whole_names)
        self.summary = {"format": "peft", "tensors": self.report, "relative_error": total,
                        "left_out": sorted(self.skipped), "modules": len(self.ranks),
                        "left_out_share": (self._sq_left / whole) ** 0.5 if whole else 0.0,
                        "saved_whole": whole_names}
