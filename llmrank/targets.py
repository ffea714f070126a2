"""What ``llmrank eval`` (and the lm-evaluation-harness adapter) can evaluate: a built-in
name, a Hugging Face folder (slim checkpoints included) or an ONNX file, each turned into
a logits function and its tokenizer. A library module: the CLI and ``llmrank.lmeval`` both
import it, it imports neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def find_tokenizer_dir(onnx_path: Path) -> Path | None:
    """A folder next to an exported ONNX file that holds a tokenizer (the prune output layout
    is ``out/onnx/model.onnx`` + ``out/hf/``)."""
    for folder in (onnx_path.parent, onnx_path.parent.parent / "hf", onnx_path.parent.parent):
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return folder
    return None


def load_tokenizer(name_or_folder: str | Path):
    path = Path(name_or_folder).expanduser()
    if path.is_dir():
        from llmrank.models import tokenizer_from_folder

        return tokenizer_from_folder(path)
    from llmrank.models import load_tokenizer as load_named

    return load_named(str(name_or_folder))


def load_torch_model(target: str):
    """(model, tokenizer or None, kind) for a built-in name, a slim or stock HF folder, or a hub id.

    A folder whose config has an ``llmrank`` entry (written by ``save_hf``) is rebuilt with
    ``llmrank.load``, which handles per-layer FFN widths; any other folder goes through
    ``from_pretrained`` of the causal-LM class its config.json names (GPT2LMHeadModel, ...).
    A model without a language-model head is refused: perplexity and tasks need logits.
    """
    from llmrank.models import read_config_json

    path = Path(target).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
        if "llmrank" in read_config_json(path):
            from llmrank.exporters.hf import load_hf

            model = load_hf(path)
            has_tok = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
            return model, (load_tokenizer(path) if has_tok else None), "hf-slim"
    from llmrank.models import load_model

    model, tokenizer = load_model(target)
    if model.get_output_embeddings() is None:
        raise ValueError(f"{target} loads as {type(model).__name__}, which has no language-model head: "
                         f"perplexity and tasks need a causal LM (config.json architectures "
                         f"{getattr(model.config, 'architectures', None)})")
    return model, tokenizer, "hf-folder" if path.is_dir() else "builtin-or-hub"


def load_eval_target(target: str, tokenizer: str | None = None, *, onnx: bool | None = None, threads: int | None = None):
    """(LogitsFn, tokenizer, info) for a model name/folder or a ``.onnx`` file."""
    from llmrank.evaluate import onnx_logits_fn, torch_logits_fn

    path = Path(target).expanduser()
    if (path / "genai_config.json").is_file():  # an onnxruntime-genai folder: the deployed artefact itself
        from llmrank.exporters.genai import genai_logits_fn

        return genai_logits_fn(path, threads=threads), load_tokenizer(tokenizer or path), {"kind": "genai", "path": str(path)}
    if path.suffix == ".gguf" and not onnx:
        return gguf_eval_target(path, tokenizer, threads=threads)
    is_onnx = path.suffix == ".onnx" if onnx is None else onnx
    if is_onnx:
        if path.is_dir():
            candidates = sorted(path.glob("*.onnx")) or sorted(path.glob("onnx/*.onnx"))
            if len(candidates) != 1:
                raise FileNotFoundError(f"--onnx: {path} holds {len(candidates)} .onnx files; give the file itself")
            path = candidates[0]
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file {path} does not exist")
        tok_src: Any = tokenizer or find_tokenizer_dir(path)
        if tok_src is None:
            raise ValueError(f"no tokenizer found next to {path}: pass --tokenizer FOLDER_OR_BUILTIN_NAME")
        return onnx_logits_fn(path, threads=threads), load_tokenizer(tok_src), {"kind": "onnx", "path": str(path), "tokenizer": str(tok_src)}
    model, tok, kind = load_torch_model(target)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    if tok is None:
        raise ValueError(f"{target} has no tokenizer: pass --tokenizer FOLDER_OR_BUILTIN_NAME")
    from llmrank.api import count_parameters

    return torch_logits_fn(model), tok, {"kind": kind, "path": target, "parameters": count_parameters(model), "model": model}


def gguf_eval_target(path: Path, tokenizer: str | None = None, *, threads: int | None = None):
    """(LogitsFn, tokenizer, info) for a GGUF file: run by llama.cpp when llama-cpp-python is
    installed, else read by transformers' GGUF loader.

    Without llama.cpp the weights are dequantised to float32 and run in PyTorch: that scores what
    the file holds (the converter's layout and rounding), not llama.cpp's kernels; ``info["runtime"]``
    says which ran."""
    from llmrank.exporters.llamacpp import gguf_logits_fn, llama_cpp_available

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    tok_src: Any = tokenizer or find_tokenizer_dir(path)
    if tok_src is not None:
        tok = load_tokenizer(tok_src)
    else:
        import transformers

        tok, tok_src = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), f"{path} (its own vocabulary)"
    info: dict[str, Any] = {"kind": "gguf", "path": str(path), "tokenizer": str(tok_src)}
    if llama_cpp_available():
        import llama_cpp

        info["runtime"] = f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
        return gguf_logits_fn(path, threads=threads), tok, info
    from llmrank.api import count_parameters
    from llmrank.evaluate import torch_logits_fn
    from llmrank.exporters.gguf import load_gguf_model

    model = load_gguf_model(path)
    info["parameters"] = count_parameters(model)
    info["runtime"] = "transformers' GGUF reader: weights dequantised to float32, run in PyTorch (not llama.cpp's kernels)"
    return torch_logits_fn(model), tok, info


# ---------------------------------------------------------------- data
