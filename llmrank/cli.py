"""The ``llmrank`` command: prune, heal, inspect, export, generate, eval, sweep.

Errors print their message (bounded) and a hint for their cause and exit non-zero; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_USAGE, EXIT_FAILED = 2, 1
GGUF_TYPES = ("f16", "bf16", "q8_0", "f32", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m",
              "q6_k")  # exporters/gguf.py OUTTYPES (tests/test_gguf.py checks they agree)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--verbose", action="store_true", help="log each pass as it runs, with its time")


_GROUP_TITLES = {"budget": "budget (how much to cut)", "quality": "quality (how to choose and repair)",
                 "advanced": "advanced (research knobs of the scorers and the refit)"}


def _pruning_options(p: argparse.ArgumentParser, *, only: tuple[str, ...] | None = None, presets: bool = False) -> dict:
    """One flag per PruneConfig option, with its help, choices and the command's default, in the
    option's help group (budget, quality, advanced); returns the groups. ``presets``: a
    ``--preset`` flag, and the options a preset sets default to None (filled by prune_config)."""
    from llmrank.passes.config import GROUPS, cli_options, option_group
    from llmrank.presets import DEFAULT_PRESET, PRESETS, preset_fields

    groups = {g: p.add_argument_group(_GROUP_TITLES[g]) for g in GROUPS}
    if presets:
        groups["quality"].add_argument(
            "--preset", choices=tuple(PRESETS), default=None,
            help="a measured trade-off of prune time and quality: " + "; ".join(f"{k}: {v.summary}" for k, v in PRESETS.items())
                 + f" (default: {DEFAULT_PRESET}). A flag given beside it wins over the preset's value")
    by_preset = preset_fields() if presets else set()
    for name, default, meta in cli_options():
        if only is not None and name not in only:
            continue
        kind = {float: float, int: int, str: str}.get(type(default), float)
        if name in by_preset:
            help_text, default = meta["help"] + " (default: from --preset)", None
        elif name == "multiple" and presets:  # prune: --gguf picks llama.cpp's row block when none is given
            help_text, default = meta["help"] + f" (default: {default}; with --gguf, 32, or 256 for K-quants)", None
        else:
            help_text = meta["help"] + (f" (default: {default})" if default is not None else "")
        groups[option_group(name)].add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=default,
                                                choices=meta["choices"], help=help_text)
    return groups


def _genai_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--genai", choices=("int4", "fp16", "fp32"), default=None,
                   help=f"{what}: int4 (MatMulNBits), fp16 (CUDA only) or fp32; needs 'llmrank[genai]'")
    p.add_argument("--genai-device", choices=("cpu", "cuda"), default="cpu", help="execution provider the genai graph is built for")


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="wiki", help="wiki, a .txt file, a folder of .txt files, or a HF dataset name")
    p.add_argument("--samples", type=int, default=16, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=512, help="calibration sequence length (tokens)")


def prune_config(args: argparse.Namespace) -> Any:
    """The PruneConfig the parsed flags describe (checked at once: a bad value fails here): a flag
    given on the command line, else the preset's value (prune), else the command's default."""
    from llmrank.passes.config import PruneConfig, cli_options
    from llmrank.presets import DEFAULT_PRESET, preset

    chosen = preset(getattr(args, "preset", None) or DEFAULT_PRESET).options if hasattr(args, "preset") else {}
    values = {}
    for name, default, _ in cli_options():
        if hasattr(args, name):
            given = getattr(args, name)
            values[name] = given if given is not None else chosen.get(name, default)
    return PruneConfig(**values)


def compensation_samples(args: argparse.Namespace) -> int:
    """--compensation-samples if given, else the preset's."""
    from llmrank.presets import DEFAULT_PRESET, preset

    if args.compensation_samples is not None:
        return args.compensation_samples
    return preset(args.preset or DEFAULT_PRESET).compensation_samples


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmrank", description="Structured FFN pruning by graph centrality, to slim ONNX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and write slim ONNX + HF checkpoint + report")
    p.add_argument("model", help="built-in name (smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b, minilm-l6), local HF folder or hub id")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist unless --force)")
    _pruning_options(p, presets=True)
    data = p.add_argument_group("calibration data")
    _data_options(data)
    data.add_argument("--compensation-samples", type=int, default=None,
                      help="calibration sequences for the compensation statistics (the refit wants more tokens than "
                           "scoring; default: from --preset)")
    outputs = p.add_argument_group("outputs")
    execution = p.add_argument_group("execution (how, never what, is pruned)")
    heal = p.add_argument_group("heal before export")
    p = outputs  # the flags below, up to --no-verify, are outputs
    p.add_argument("--onnx", dest="onnx", action="store_true", default=None, help="write ONNX (default: on)")
    p.add_argument("--no-onnx", dest="onnx", action="store_false")
    p.add_argument("--hf", dest="hf", action="store_true", default=None, help="write a HF checkpoint (default: on)")
    p.add_argument("--no-hf", dest="hf", action="store_false")
    p.add_argument("--no-kv-cache", action="store_true", help="export logits-only ONNX (no past key/values)")
    p.add_argument("--optimize", action="store_true", help="apply onnxruntime graph optimisation to the ONNX file")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="also write onnx/model.int8.onnx: int8 MatMul weights by onnxruntime's quantizer, checked against PyTorch")
    _genai_options(p, "also write genai/: an onnxruntime-genai folder built by its own model builder from the slim checkpoint")
    p.add_argument("--gguf", choices=GGUF_TYPES, default=None, metavar="TYPE",
                   help="also write gguf/model-TYPE.gguf for llama.cpp, by llama.cpp's own converter (fetched once from "
                        "PyPI, nothing compiled): f16, bf16, q8_0 or f32; K-quants (q4_k_m, ...) need 'llmrank[gguf]'. "
                        "Per-layer Llama widths or heads are written as llama.cpp's 'deci' architecture and checked in "
                        "llama.cpp (needs 'llmrank[gguf]')")
    p.add_argument("--no-verify", action="store_true", help="skip the shrunk == masked check")
    p = execution
    p.add_argument("--layerwise", action="store_true",
                   help="prune block by block, one decoder block in memory (chosen automatically when the model does not fit --max-memory)")
    p.add_argument("--max-memory", default=None,
                   help="memory budget, e.g. 16GB (default: what the machine has available); past it: --layerwise, spilled hidden states, no ONNX")
    p.add_argument("--device", default="cpu", help="torch device for the computation: cpu, cuda, cuda:N (default: cpu)")
    p.add_argument("--force", action="count", default=0,
                   help="replace an existing --out folder: it is deleted with everything in it; a folder "
                        "without report.json (not an llmrank output) needs --force --force")
    p = heal
    p.add_argument("--heal-tokens", type=int, default=None,
                   help="heal the slim model before export: distil it from the dense one for N tokens (see 'llmrank heal')")
    p.add_argument("--heal-minutes", type=float, default=None, help="heal for at most M minutes of training (with or without --heal-tokens)")
    p.add_argument("--heal-lr", type=float, default=None,
                   help="heal learning rate (default: 1.6e-3 x each weight's RMS for the weights, 3e-3 for LoRA)")
    p.add_argument("--heal-train", choices=("lora", "weights"), default="weights",
                   help="heal the pruned Linears' own weights (default) or LoRA adapters (merged at the end; needs 'llmrank[heal]')")
    p.add_argument("--heal-bf16", action="store_true", help="heal under bfloat16 autocast (see heal --bf16)")
    _common(execution)

    p = sub.add_parser("heal", help="distil a pruned checkpoint from its dense model (LoRA merged) and write hf/, onnx/, report, plot")
    p.add_argument("slim", type=Path, help="the hf/ folder of a prune (any llmrank slim checkpoint)")
    p.add_argument("--teacher", required=True, help="the dense model it was pruned from (built-in name, folder or hub id)")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist unless --force; never the input)")
    p.add_argument("--tokens", type=int, default=None, help="training tokens (whole sequences of --seq-len)")
    p.add_argument("--minutes", type=float, default=None, help="training minutes (evaluations not counted); with --tokens: whichever ends first")
    p.add_argument("--lr", type=float, default=None,
                   help="one learning rate for every trained tensor (default: 1.6e-3 x each weight's RMS, about 3e-4 on "
                        "SmolLM2; LoRA: 3e-3)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--train", choices=("lora", "weights"), default="weights",
                   help="the Linears' own weights (default; AdamW state: 2x their size) or LoRA adapters (needs 'llmrank[heal]'; "
                        "far less memory for big models)")
    p.add_argument("--targets", choices=("pruned", "all"), default="pruned", help="the FFN Linears pruning cut, or every Linear but the LM head")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per optimizer step")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="cosine",
                   help="learning rate over the budget: constant, or cosine down to a tenth")
    p.add_argument("--hidden-weight", type=float, default=0.0,
                   help="add this weight times the blocks' relative hidden-state mismatch to the KL (0: logits only)")
    p.add_argument("--bf16", action="store_true",
                   help="train under bfloat16 autocast (weights and optimizer stay fp32): about 2x faster on CPUs with bf16 matmuls")
    p.add_argument("--calib", default="wiki", help="text to heal on: its calibration half (wiki, a .txt file or a folder)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-points", type=int, default=4, help="held-out perplexity evaluations during the heal (the curve)")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", default=True, help="write only hf/ (no onnx/)")
    p.add_argument("--no-kv-cache", action="store_true", help="export logits-only ONNX (no past key/values)")
    p.add_argument("--gguf", choices=GGUF_TYPES, default=None, metavar="TYPE",
                   help="also write gguf/model-TYPE.gguf of the healed model for llama.cpp (see prune --gguf)")
    p.add_argument("--force", action="count", default=0, help="replace an existing --out folder (see prune --force)")
    _common(p)

    p = sub.add_parser("inspect", help="show the channel groups found in the graph and what a cut would remove")
    p.add_argument("model")
    _pruning_options(p, only=("sparsity",))
    _common(p)

    p = sub.add_parser("export", help="export an (already pruned) HF checkpoint folder to ONNX")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", required=True, help="path of the .onnx file, or a folder (trailing / or existing) for FOLDER/model.onnx")
    p.add_argument("--no-kv-cache", action="store_true")
    p.add_argument("--optimize", action="store_true")
    p.add_argument("--quantize", choices=("int8",), default=None, help="write int8 MatMul weights (onnxruntime's quantizer), checked against PyTorch")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="weights, activations and KV cache of the ONNX file (a bf16/fp16 checkpoint is loaded in fp32 first); "
                        "fp16 is checked against the fp32 model within a stated bound")
    _genai_options(p, "write an onnxruntime-genai folder at --out instead of an .onnx file")
    p.add_argument("--gguf", choices=GGUF_TYPES, default=None, metavar="TYPE",
                   help="write a GGUF file for llama.cpp at --out (a .gguf path) instead, by llama.cpp's converter: "
                        "f16, bf16, q8_0, f32 (K-quants need 'llmrank[gguf]'); per-layer Llama widths as 'deci' (needs 'llmrank[gguf]')")
    p.add_argument("--force", action="count", default=0,
                   help="replace an existing .onnx file (it is deleted); any other existing file needs --force --force")
    _common(p)

    p = sub.add_parser("generate", help="greedy generation with onnxruntime (and the KV cache), onnxruntime-genai or llama.cpp")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--onnx", type=Path, help="an .onnx file written by llmrank")
    target.add_argument("--genai", type=Path, help="an onnxruntime-genai folder (it holds its tokenizer)")
    target.add_argument("--gguf", type=Path, help="a .gguf file, run by llama.cpp (needs llmrank[gguf])")
    p.add_argument("--tokenizer", default=None, help="folder or built-in model name holding the tokenizer (needed with "
                                                      "--onnx; --gguf finds the hf/ folder of a prune by itself)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    _common(p)

    from llmrank.evalcmd import add_eval_parser, add_sweep_parser

    add_eval_parser(sub, _common)
    add_sweep_parser(sub, _common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from llmrank.quiet import quiet_libraries

    if getattr(args, "verbose", False):
        _log_passes()
    try:
        with quiet_libraries(args.quiet):  # third-party bars, warnings and logs: only with --quiet, only for the command
            report = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("llmrank: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's contract: one line, a hint, exit code
        if args.debug:
            raise
        print(f"llmrank {args.command}: error: {error_text(exc)}", file=sys.stderr)
        hint = _hint(exc)
        print(f"hint: {hint}" + ("" if "--debug" in hint else " (rerun with --debug for the traceback)"), file=sys.stderr)
        return exit_code(exc)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
    return 0


def _log_passes() -> None:
    """Send llmrank's own log records (one per pass) to stderr; other libraries' stay as they are."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("llmrank: %(message)s"))
    logger = logging.getLogger("llmrank")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def exit_code(exc: Exception) -> int:
    """llmrank's own errors carry their code; bad paths and values from libraries are usage errors."""
    from llmrank.ir.errors import LLMRankError

    if isinstance(exc, LLMRankError):
        return exc.exit_code
    return EXIT_USAGE if isinstance(exc, (ValueError, FileExistsError, FileNotFoundError)) else EXIT_FAILED


#: An error message is printed whole up to these bounds: a state_dict mismatch lists its shapes
#: on the lines after the first, and a thousand-line message helps nobody.
MAX_ERROR_LINES, MAX_ERROR_CHARS = 12, 2000


def error_text(exc: BaseException) -> str:
    """``Type: message``, every line of it up to MAX_ERROR_LINES / MAX_ERROR_CHARS (the rest counted)."""
    lines = [line.rstrip().replace("\t", "  ") for line in str(exc).strip().splitlines() if line.strip()]
    shown: list[str] = []
    size = 0
    for line in lines[:MAX_ERROR_LINES]:
        if size + len(line) > MAX_ERROR_CHARS:
            line = line[: max(MAX_ERROR_CHARS - size, 80)] + " ..."
            shown.append(line)
            break
        shown.append(line)
        size += len(line)
    left = len(lines) - len(shown)
    if left > 0:
        shown.append(f"... ({left} more line(s); --debug shows the whole message)")
    return f"{type(exc).__name__}: " + "\n  ".join(shown)


#: Import names of optional dependencies -> the extra that installs them.
OPTIONAL_MODULES = {
    "onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx", "onnxruntime_genai": "genai", "onnx_ir": "genai",
    "peft": "heal", "matplotlib": "plot", "lm_eval": "lmeval", "gensim": "models", "torch_pruning": "bench",
    "llama_cpp": "gguf",
}


def missing_extra(exc: BaseException) -> str | None:
    """The extra that installs the module an ImportError names (None when it names none we know)."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if name in OPTIONAL_MODULES:
        return OPTIONAL_MODULES[name]
    text = str(exc)
    for module, extra in OPTIONAL_MODULES.items():
        if f"'{module}'" in text or f"install {module}" in text:
            return extra
    return None


def _hint(exc: Exception) -> str:
    """What to do about ``exc``, by its cause; errors that know their fix carry it as ``hint``."""
    from llmrank.ir.errors import ConfigError, ExportError, InputError, VerificationError

    if getattr(exc, "hint", None):
        return str(exc.hint)
    if isinstance(exc, ImportError):
        extra = missing_extra(exc)
        if extra:
            return f"install the optional dependency: pip install 'llmrank[{extra}]'"
        return "a required package is missing or broken: reinstall llmrank (see README, Install)"
    if isinstance(exc, FileExistsError):
        return "choose a new --out folder or pass --force"
    if isinstance(exc, PermissionError):
        return "check the permissions of the path named in the message"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return "check the path named in the message"
    if isinstance(exc, MemoryError):
        return "the model does not fit: pass --layerwise or a smaller --max-memory, --samples or --seq-len"
    if isinstance(exc, ConfigError):
        return "check the option values with --help"
    if isinstance(exc, InputError):
        return "the model, data or file named in the message cannot be used as it is: fix or replace it"
    if isinstance(exc, (VerificationError, ExportError)):
        return "nothing was written; this is a bug unless the model computes non-finite values: please report it"
    if isinstance(exc, OSError):
        return "the file system refused an operation on the path named in the message"
    if isinstance(exc, ValueError):
        return "a value read from the model, the data or an option is out of range; the message names it"
    return "see the message above; rerun with --debug to see where it came from"


#: The modules ONNX export and its check import (torch.onnx's exporter needs onnx and onnxscript).
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")


def require_onnx(what: str, instead: str) -> None:
    """Refuse an ONNX export before any model is read when the 'onnx' extra is missing: the
    import would otherwise fail only after minutes of pruning or healing."""
    import importlib.util

    from llmrank.ir.errors import ConfigError

    missing = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        error = ConfigError(f"{what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed")
        error.hint = f"pip install 'llmrank[onnx]', or {instead}"
        raise error


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet and not args.json:
        print(text)


def _note(text: str) -> None:
    """A note is something to act on (a skipped export, a moved sparsity): on stderr, even with
    --quiet or --json, which hide the tables only."""
    print(f"note: {text}", file=sys.stderr)


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    from llmrank.ir.errors import ConfigError
    from llmrank.presets import DEFAULT_PRESET
    from llmrank.workflow import PruneJob, parse_size, run_prune

    config = prune_config(args).with_(verify=not args.no_verify)
    if args.gguf and args.multiple is None:  # widths llama.cpp can quantize and run whole (exporters/gguf.py)
        from llmrank.exporters.gguf import row_multiple

        config = config.with_(multiple=row_multiple(args.gguf))
    if args.onnx is not False or args.quantize:
        require_onnx("ONNX export (on by default)", "pass --no-onnx for the HF checkpoint only")
    job = PruneJob(
        model=args.model, out=args.out, config=config, calib=args.calib, samples=args.samples,
        compensation_samples=compensation_samples(args), preset=args.preset or DEFAULT_PRESET, seq_len=args.seq_len, onnx=args.onnx is not False,
        hf=args.hf is not False, kv_cache=not args.no_kv_cache, optimize=args.optimize, quantize=args.quantize,
        genai=args.genai, genai_device=args.genai_device, gguf=args.gguf, force=args.force,
        progress=not (args.quiet or args.json), layerwise=args.layerwise, device=args.device,
        max_memory=parse_size(args.max_memory) if args.max_memory is not None else None,
        heal_tokens=args.heal_tokens, heal_minutes=args.heal_minutes, heal_lr=args.heal_lr, heal_train=args.heal_train,
        heal_bf16=args.heal_bf16,
    )
    try:
        report = run_prune(job)
    except ConfigError as error:
        raise _with_preset_hint(error, args) from None
    _say(args, summary_table(report))
    for note in report.get("notes") or []:
        _note(note)
    _say(args, f"\nwritten: {args.out}/ ({', '.join(sorted(report['artifacts']))}, report.json)")
    return report


def _with_preset_hint(error: Exception, args: argparse.Namespace) -> Exception:
    """A refusal of an option the preset set (not the user): name the preset and one that runs."""
    from llmrank.presets import DEFAULT_PRESET, preset

    name = args.preset or DEFAULT_PRESET
    from_preset = {k: v for k, v in preset(name).options.items() if getattr(args, k, None) is None}
    named = [k for k in from_preset if k in str(error) or k.replace("_", "-") in str(error)]
    if not named or name == DEFAULT_PRESET:
        return error
    values = ", ".join(f"--{k.replace('_', '-')} {from_preset[k]}" for k in named)
    return type(error)(f"{error} (--preset {name} set {values}; --preset {DEFAULT_PRESET} avoids it)")


def summary_table(report: dict[str, Any]) -> str:
    from llmrank.report import human_bytes, table

    widths = report["widths"]
    after = sorted({w["after"] for w in widths.values()})
    before = sorted({w["before"] for w in widths.values()})
    ver = report.get("verification") or {}
    rows = [
        ("parameters", f"{report['params_before']:,}", f"{report['params_after']:,}"),
        ("FFN width", "/".join(map(str, before)), f"{min(after)}..{max(after)}" if len(after) > 1 else str(after[0])),
        ("groups pruned", str(len(widths)), ""),
        *_head_rows(report.get("heads") or {}),
        ("verified (shrunk == masked)", "", f"{ver.get('ok')} (max diff {ver.get('max_abs_diff', float('nan')):.2g})" if ver else "skipped"),
    ]
    onnx = report["artifacts"].get("onnx")
    if onnx:
        rows.append(("ONNX size", "", human_bytes(onnx["bytes"])))
        rows.append(("ONNX vs PyTorch max diff", "", f"{max(onnx['max_abs_diff'].values()):.2g}"))
    rows.append(("time (s)", "", " ".join(f"{k}={v:.1f}" for k, v in report["timings_s"].items())))
    return table(rows, ("", "dense", "slim"))


def cmd_heal(args: argparse.Namespace) -> dict[str, Any]:
    from llmrank.healcmd import HealJob, HealOptions, run_heal

    if args.onnx:
        require_onnx("the healed model's ONNX export (on by default)", "pass --no-onnx for the HF checkpoint only")

    options = HealOptions(tokens=args.tokens, minutes=args.minutes, lr=args.lr, lora_rank=args.lora_rank, train=args.train,
                          targets=args.targets, batch_size=args.batch_size, schedule=args.schedule,
                          hidden_weight=args.hidden_weight, bf16=args.bf16, seq_len=args.seq_len, calib=args.calib,
                          seed=args.seed, eval_points=args.eval_points)
    job = HealJob(slim=args.slim, teacher=args.teacher, out=args.out, options=options, onnx=args.onnx,
                  kv_cache=not args.no_kv_cache, gguf=args.gguf, force=args.force, progress=not (args.quiet or args.json))
    report = run_heal(job)
    h = report["heal"]
    ppl = h["held_out_ppl"]
    _say(args, f"healed {h['tokens']:,} tokens in {h['train_seconds']:.0f} s ({h['tokens_per_second']:.0f} tokens/s, "
               f"stopped by {h['stopped_by']}); held-out perplexity {ppl['before']:.2f} -> {ppl['after']:.2f} "
               f"(dense {ppl['dense']:.2f}: {ppl['before_ratio']:.2f}x -> {ppl['after_ratio']:.2f}x)")
    _say(args, f"written: {args.out}/ ({', '.join(sorted(report['artifacts']))}, report.json)")
    return report


def _head_rows(heads: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Query / KV heads per layer, before and after (ranges when layers differ)."""
    if not heads:
        return []

    def span(values: list[int]) -> str:
        return str(values[0]) if min(values) == max(values) else f"{min(values)}..{max(values)}"

    rows = []
    for key, label in (("heads", "query heads per layer"), ("kv_heads", "KV heads per layer")):
        rows.append((label, span([h[key][0] for h in heads.values()]), span([h[key][1] for h in heads.values()])))
    return rows


def cmd_inspect(args: argparse.Namespace) -> dict[str, Any]:
    import llmrank
    from llmrank.report import table
    from llmrank.workflow import load

    prune_config(args)
    model, _, _ = load(args.model)
    ir = llmrank.analyze(llmrank.trace(model))
    total = llmrank.count_parameters(model)
    rows = []
    for g in ir.groups:
        cut = round(args.sparsity * g.width)
        rows.append((g.name, g.width, g.width - cut, f"{100 * g.width * ir.channel_cost(g) / total:.2f}%", ", ".join(f"{s.param.rsplit('.', 2)[-2]}[{s.axis}]" for s in g.slots)))
    prunable = ir.prunable_parameters()
    report = {
        "model_class": ir.model_class, "parameters": total, "prunable_parameters": prunable,
        "groups": [g.name for g in ir.groups], "removed_at_sparsity": round(args.sparsity * prunable), "blocked": ir.blocked,
        "ir": ir.to_dict(),
    }
    _say(args, table(rows, ("group", "width", f"kept @ {args.sparsity}", "param share", "slots")))
    _say(args, f"\n{ir.model_class}: {total:,} parameters, {prunable:,} ({100 * prunable / total:.1f}%) in {len(ir.groups)} prunable groups; "
         f"a cut of {args.sparsity} removes ~{report['removed_at_sparsity']:,}.")
    if ir.head_groups:
        hg = ir.head_groups[0]
        heads = sum(h.heads * h.head_cost(ir.linears) + h.kv_heads * h.kv_cost(ir.linears) for h in ir.head_groups)
        _say(args, f"attention: {len(ir.head_groups)} head groups (e.g. {hg.name}: {hg.heads} query / {hg.kv_heads} KV heads of "
             f"{hg.head_dim}), {heads:,} ({100 * heads / total:.1f}%) parameters in heads (--head-sparsity)")
    blocked_heads = [k for k in ir.blocked if k.startswith("heads:")]
    if blocked_heads:
        _say(args, f"attention heads not cut in {len(blocked_heads)} place(s), e.g. {blocked_heads[0]}: {ir.blocked[blocked_heads[0]]}")
    _say(args, f"not cut ({len(ir.blocked) - len(blocked_heads)} Linears' outputs): residual stream, attention projections "
         "(cut as whole heads), tied or output layers")
    return report


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from llmrank.exporters.hf import load_hf
    from llmrank.exporters.onnx import export_onnx
    from llmrank.workflow import ONNX_ATOL, ONNX_RTOL

    args.checkpoint = checkpoint_folder(args.checkpoint)
    if args.gguf:
        from llmrank.exporters.gguf import export_gguf
        from llmrank.ir.errors import ConfigError

        if args.genai:
            raise ConfigError("--gguf and --genai each write the whole --out: export them one at a time")
        out = Path(args.out)
        if str(args.out).endswith(("/", "\\")) or out.is_dir():
            out = out / f"model-{args.gguf}.gguf"
        built = export_gguf(args.checkpoint, out, outtype=args.gguf, force=args.force)
        _say(args, f"wrote {built.path} ({built.bytes / 2**20:.1f} MiB, GGUF {built.outtype}, {built.architecture})")
        for note in built.notes:
            _note(note)
        return built.to_dict()
    if args.genai:
        from llmrank.exporters.genai import check_options, export_genai

        check_options(args.genai, args.genai_device)
        built = export_genai(args.checkpoint, args.out, precision=args.genai, device=args.genai_device, force=args.force)
        _say(args, f"wrote {built.path} ({built.bytes / 2**20:.1f} MiB, onnxruntime-genai {built.precision})")
        return built.to_dict()
    require_onnx("export", "use --genai (needs 'llmrank[genai]')")
    from llmrank.exporters.atomic import check_writable
    from llmrank.exporters.onnx import onnx_target

    import torch

    from llmrank.exporters.onnx import ONNX_DTYPES
    from llmrank.ir.errors import ConfigError

    if args.quantize and args.dtype != "fp32":
        raise ConfigError("--quantize int8 quantizes an fp32 file: drop --dtype")
    out = check_writable(onnx_target(args.out), args.force)  # before loading: refuse in seconds
    # fp32 whatever the checkpoint holds: onnxruntime's CPU kernels have no bf16 MatMul, and the
    # fp16 file is checked against the fp32 model
    model = load_hf(args.checkpoint, dtype=torch.float32)
    if not args.quantize:
        res = export_onnx(model, out, with_past=not args.no_kv_cache, metadata={"source_model": str(args.checkpoint)},
                          optimize=args.optimize, force=args.force, atol=ONNX_ATOL, rtol=ONNX_RTOL,
                          dtype=ONNX_DTYPES[args.dtype])
        lossy = "" if res.relative_error is None else (f", relative logit error vs fp32 {res.relative_error:.3g}, "
                                                        f"top-1 agreement {res.top1_agreement:.3f}")
        _say(args, f"wrote {res.path} ({res.total_bytes / 2**20:.1f} MiB, {res.dtype}), "
                   f"max |ORT - PyTorch| {max(res.max_abs_diff.values()):.2g}{lossy}")
        return {"path": str(res.path), "bytes": res.total_bytes, "with_past": res.with_past, "max_abs_diff": res.max_abs_diff,
                "dtype": res.dtype, "relative_error": res.relative_error, "top1_agreement": res.top1_agreement,
                "external_data": str(res.data_path) if res.data_path else None}
    import tempfile

    from llmrank.exporters.quantize import quantize_onnx

    with tempfile.TemporaryDirectory(prefix="llmrank-fp32-") as scratch:  # the fp32 file is only a step
        res = export_onnx(model, Path(scratch) / "model.onnx", with_past=not args.no_kv_cache, optimize=args.optimize,
                          metadata={"source_model": str(args.checkpoint)}, atol=ONNX_ATOL, rtol=ONNX_RTOL)
        q = quantize_onnx(res.path, out, model, force=args.force)
    _say(args, f"wrote {q.path} ({q.bytes / 2**20:.1f} MiB, int8), relative logit error {q.relative_error:.3g}, "
               f"top-1 agreement {q.top1_agreement:.3f}")
    return {"path": str(q.path), "bytes": q.bytes, "with_past": res.with_past, "int8": q.to_dict()}


def checkpoint_folder(checkpoint: Path) -> Path:
    """The folder ``export`` reads: an existing HF folder, or a built-in name (as prune and
    inspect accept it), converted on first use."""
    from llmrank.models import BUILTIN_MODELS, resolve_model_dir

    if not checkpoint.exists() and str(checkpoint) in BUILTIN_MODELS:
        return resolve_model_dir(str(checkpoint))
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a HF checkpoint folder (no config.json) nor a built-in model "
                                f"name ({', '.join(sorted(BUILTIN_MODELS))})")
    return checkpoint


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from llmrank.ir.errors import ConfigError
    from llmrank.models import tokenizer_from_folder

    if args.genai is not None and not (args.genai / "genai_config.json").is_file():
        what = "does not exist" if not args.genai.exists() else "has no genai_config.json"
        raise ConfigError(f"--genai {args.genai} {what}: give the genai/ folder of a prune or export --genai")
    if args.onnx is not None and not args.onnx.is_file():
        raise ConfigError(f"--onnx {args.onnx} is not a file: give the .onnx file of a prune or export")
    if args.gguf is not None:
        from llmrank.exporters.llamacpp import INSTALL_HINT, llama_cpp_available

        if not args.gguf.is_file():
            raise ConfigError(f"--gguf {args.gguf} is not a file: give the .gguf file of a prune or export --gguf")
        if not llama_cpp_available():
            raise ConfigError(f"--gguf runs the file in llama.cpp, which needs llama-cpp-python: {INSTALL_HINT}")
    folder = args.tokenizer or args.genai
    if folder is None and args.gguf is not None:
        from llmrank.targets import find_tokenizer_dir

        folder = find_tokenizer_dir(args.gguf)
    if folder is None:
        raise ConfigError(f"--{'gguf' if args.gguf else 'onnx'} needs --tokenizer (the hf/ folder of the prune output, "
                          "or a built-in name)")
    if not Path(folder).is_dir():
        from llmrank.models import resolve_model_dir

        folder = resolve_model_dir(str(folder))
    tokenizer = tokenizer_from_folder(Path(folder))
    ids = tokenizer(args.prompt, return_tensors=None)["input_ids"]
    if args.genai:
        from llmrank.exporters.genai import generate_genai

        new = generate_genai(args.genai, ids, args.max_new_tokens)
    elif args.gguf:
        from llmrank.exporters.llamacpp import generate_gguf

        new = generate_gguf(args.gguf, ids, args.max_new_tokens)
    else:
        from llmrank.exporters.onnx import generate_onnx

        new = generate_onnx(args.onnx, ids, args.max_new_tokens, tokenizer=tokenizer)
    text = tokenizer.decode(new, skip_special_tokens=True)
    _say(args, args.prompt + text)
    return {"prompt": args.prompt, "tokens": new, "text": text}


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from llmrank.evalcmd import cmd_eval as run

    return run(args)


def cmd_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from llmrank.evalcmd import cmd_sweep as run

    return run(args)


COMMANDS = {"prune": cmd_prune, "heal": cmd_heal, "inspect": cmd_inspect, "export": cmd_export, "generate": cmd_generate,
            "eval": cmd_eval, "sweep": cmd_sweep}


if __name__ == "__main__":
    sys.exit(main())
