"""``llmrank eval`` and ``llmrank sweep``: the evaluation protocol shared by both commands.

Perplexity is measured on the built-in wiki corpus's *eval* articles (disjoint from the
calibration articles), on the first N tokens of that split tokenised as one stream, with
windows of ``seq_len`` tokens every ``stride`` tokens (llmrank.evaluate.perplexity). The
protocol goes into every report next to the numbers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

DEFAULT_TASKS = "hyperbaton,step_inference,social_iqa"


from llmrank.targets import load_eval_target, load_torch_model  # noqa: E402


def parse_tokens(text: str) -> int | None:
    """--ppl-tokens: a count, ``all`` (None = the whole split) or 0 (skip perplexity)."""
    if str(text).lower() in ("all", "-1"):
        return None
    try:
        n = int(text)
    except ValueError as exc:
        raise ValueError(f"--ppl-tokens must be a number or 'all', got {text!r}") from exc
    if n < 0:
        raise ValueError(f"--ppl-tokens must be >= 0 or 'all', got {n}")
    return n


def ppl_stream(tokenizer, source: str, n_tokens: int | None):
    """(LongTensor[1, T], protocol dict) from the eval split of ``source``; None if n == 0."""
    from llmrank.data import load_text_source, tokenize_text

    if n_tokens == 0:
        return None, {}
    ids = tokenize_text(tokenizer, load_text_source(source, "eval"))
    available = int(ids.numel())
    if n_tokens is not None:
        ids = ids[:n_tokens]
    split = {"wiki": "wiki eval articles (second half of the built-in corpus, disjoint from the calibration articles)",
             "botchan": "botchan eval half (the novel's second half of lines)"}.get(
        source, f"{source} (used whole: the calib/eval split applies only to the built-in texts and HF datasets)")
    return ids.unsqueeze(0), {"source": source, "split": split, "tokens_used": int(ids.numel()), "tokens_available": available}


def tune_stream(tokenizer, args: argparse.Namespace, n_tokens: int | None):
    """Like ppl_stream, from the calib split with the calibration windows taken out."""
    from llmrank.data import tuning_tokens

    if n_tokens == 0:
        return None, {}
    if args.ppl_source != args.calib:
        raise ValueError("--ppl-split tune scores the calibration source itself: leave --ppl-source equal to --calib")
    ids = tuning_tokens(tokenizer, args.calib, n=args.samples, seq_len=args.calib_seq_len, seed=args.seed)
    available = int(ids.shape[1])
    ids = ids if n_tokens is None else ids[:, :n_tokens]
    split = f"{args.calib} calib split minus the {args.samples}x{args.calib_seq_len} calibration windows (tuning text)"
    return ids, {"source": args.calib, "split": split, "tokens_used": int(ids.shape[1]), "tokens_available": available}


def parse_tasks(text: str | None) -> list[str]:
    from llmrank.sweep import resolve_task
    from llmrank.tasks import TASKS

    if text is None or str(text).strip().lower() in ("", "none"):
        return []
    names = [resolve_task(t.strip()) for t in str(text).split(",") if t.strip()]
    for n in names:
        if n not in TASKS:
            raise ValueError(f"unknown task {n!r}; choose from {', '.join(sorted(TASKS))} (step_inference is an alias)")
    return names


def load_items(tasks: list[str], limit: int | None, seed: int) -> dict[str, list]:
    from llmrank.ir.errors import InputError
    from llmrank.tasks import TaskDataUnavailable, load_task

    try:
        return {name: load_task(name, limit=limit, seed=seed) for name in tasks}
    except TaskDataUnavailable as gone:
        raise InputError(f"{gone}; or measure perplexity only with --tasks none") from gone


# ---------------------------------------------------------------- parsers


def _check_positions(info: dict[str, Any], seq_len: int) -> None:
    """--seq-len must fit the model's positions: the torch model's config, or for an ONNX file
    the config.json beside its tokenizer (the prune layout's hf/), when there is one."""
    from llmrank.models import check_seq_len, read_config

    model = info.get("model")
    if model is not None and getattr(model, "config", None) is not None:
        check_seq_len(model.config, seq_len)
        return
    source = info.get("tokenizer")
    if source is None:
        return
    folder = Path(source).expanduser()
    config = read_config(str(source)) if (folder / "config.json").is_file() or not folder.exists() else None
    if config is not None:
        check_seq_len(config, seq_len)


def _check_ppl_window(seq_len: int, stride: int | None) -> None:
    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
    if stride is not None and not 0 < stride <= seq_len:
        raise ValueError(f"--stride must be in [1, --seq-len], got {stride}")


def add_ppl_options(p: argparse.ArgumentParser, *, default_tokens: str) -> None:
    p.add_argument("--ppl-tokens", default=default_tokens,
                   help=f"tokens of the eval split to score (default {default_tokens}; 'all' = whole split, 0 = skip)")
    p.add_argument("--ppl-source", default="wiki", help="wiki (its eval articles), a .txt file or a folder of .txt files")
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window length (tokens)")
    p.add_argument("--stride", type=int, default=None, help="perplexity window stride (default: --seq-len, no overlap)")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma list of BIG-bench tasks, or 'none' (default {DEFAULT_TASKS})")
    p.add_argument("--limit", type=int, default=None, help="items per task (a seeded random subset)")
    p.add_argument("--batch-size", type=int, default=16, help="multiple-choice requests per forward")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/onnxruntime intra-op threads (1 is often fastest on a shared, loaded CPU)")


def add_eval_parser(sub, common) -> None:
    p = sub.add_parser("eval", help="perplexity and zero-shot task accuracy of a model, a slim checkpoint or an ONNX file")
    p.add_argument("model", help="built-in name, HF folder (slim checkpoints included) or .onnx file")
    p.add_argument("--onnx", action="store_true", help="treat MODEL as an ONNX file (default: by its .onnx suffix)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or built-in name (needed for ONNX files unless one sits next to it)")
    add_ppl_options(p, default_tokens="4096")
    p.add_argument("--seed", type=int, default=0, help="seed of the task subsets")
    common(p)


def add_sweep_parser(sub, common) -> None:
    from llmrank.passes.score import SCORERS

    p = sub.add_parser("sweep", help="prune at every scorer x sparsity (x ...) and evaluate: tables, plots, resumable")
    p.add_argument("model", help="built-in name or HF folder")
    p.add_argument("--scorers", default="wpr,mpr,l1,activation,wanda,random", help=f"comma list from {', '.join(SCORERS)}, or package.module:function")
    p.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5")
    p.add_argument("--representations", default="chained", help="comma list from isolated, chained, dataflow")
    p.add_argument("--compensations", default="none", help="comma list from none, bias, lstsq, lstsq+bias")
    p.add_argument("--gamma", default="0.0", help="wpr/hits gamma, comma list allowed")
    p.add_argument("--theta", default="0.5", help="wpr theta, comma list allowed")
    p.add_argument("--grid", nargs="+", default=[], metavar="NAME=V1,V2",
                   help="override any list above, e.g. --grid gamma=0,0.25,0.5,0.75,1 theta=0.5")
    from llmrank.passes.select import PRUNERS

    p.add_argument("--pruner", default="local", choices=PRUNERS)
    p.add_argument("--multiple", type=int, default=1)
    p.add_argument("--calib", default="wiki", help="calibration text: wiki (its calib articles), a .txt file or folder")
    p.add_argument("--samples", type=int, default=16, help="calibration sequences")
    p.add_argument("--compensation-samples", type=int, default=64,
                   help="calibration sequences behind the compensation statistics (as `llmrank prune`)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="calibration sequence length")
    add_ppl_options(p, default_tokens="4096")
    p.add_argument("--ppl-also", default=None, metavar="SOURCES",
                   help="comma list of second texts whose eval split is scored too (e.g. botchan), same --ppl-tokens")
    p.add_argument("--ppl-split", default="eval", choices=("eval", "tune"),
                   help="eval: the source's eval split; tune: its calib split minus the calibration windows "
                        "(choose hyper-parameters here, report on eval)")
    p.add_argument("--seed", type=int, default=0, help="seed of calibration sampling, random scores and task subsets")
    p.add_argument("--out", required=True, type=Path, help="results folder (reused: computed cells are skipped)")
    p.add_argument("--no-plots", action="store_true")
    common(p)


# ---------------------------------------------------------------- commands


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet and not args.json:
        print(text)


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import asdict

    from llmrank.data import bos_token_id
    from llmrank.evaluate import multiple_choice, perplexity
    from llmrank.report import table
    from llmrank.sweep import primary_metric, short_task

    _check_ppl_window(args.seq_len, args.stride)
    n_tokens = parse_tokens(args.ppl_tokens)
    tasks = parse_tasks(args.tasks)
    if n_tokens == 0 and not tasks:
        raise ValueError("nothing to evaluate: --ppl-tokens 0 and --tasks none")
    _set_threads(args)
    progress = not (args.quiet or args.json)
    start = time.perf_counter()
    fn, tokenizer, info = load_eval_target(args.model, args.tokenizer, onnx=True if args.onnx else None, threads=args.threads)
    if n_tokens != 0:
        _check_positions(info, args.seq_len)
    info.pop("model", None)
    report: dict[str, Any] = {"model": args.model, "target": info, "load_s": time.perf_counter() - start}
    rows = []
    ids, protocol = ppl_stream(tokenizer, args.ppl_source, n_tokens)
    if ids is not None:
        start = time.perf_counter()
        bos = bos_token_id(tokenizer)
        res = perplexity(fn, ids, seq_len=args.seq_len, stride=args.stride, progress=progress, bos_token_id=bos)
        report["perplexity"] = {**asdict(res), **protocol, "bos_token_id": bos, "seconds": time.perf_counter() - start}
        rows.append(("perplexity", f"{res.ppl:.4f}", "", f"{res.n_tokens} tokens scored"))
    if tasks:
        items = load_items(tasks, args.limit, args.seed)
        report["tasks"] = {}
        for name, its in items.items():
            start = time.perf_counter()
            res = multiple_choice(fn, tokenizer, its, batch_size=args.batch_size, progress=progress)
            report["tasks"][name] = {**asdict(res), "primary": primary_metric(name), "seconds": time.perf_counter() - start}
            rows.append((short_task(name), f"{res.acc:.4f}", f"{res.acc_norm:.4f}", f"n={res.n}, primary={primary_metric(name)}"))
    report["protocol"] = {
        "perplexity": ({"seq_len": args.seq_len, "stride": args.stride or args.seq_len, **protocol} if ids is not None else None),
        "tasks": {"names": tasks, "limit": args.limit, "seed": args.seed, "zero_shot": True,
                  "scoring": "sum log p(choice | context); acc_norm divides by the choice's characters"} if tasks else None,
    }
    _say(args, table(rows, ("metric", "value / acc", "acc_norm", "")))
    if ids is not None:
        _say(args, f"\nperplexity protocol: {protocol['tokens_used']} tokens of {protocol['split']}, "
                   f"windows of {args.seq_len} every {args.stride or args.seq_len} tokens")
    return report


def _sweep_lists(args: argparse.Namespace) -> dict[str, list]:
    from llmrank.sweep import parse_grid, parse_list

    lists = {
        "scorers": parse_list(args.scorers), "sparsities": parse_list(args.sparsities, numeric=True),
        "representations": parse_list(args.representations), "compensations": parse_list(args.compensations),
        "gammas": parse_list(args.gamma, numeric=True), "thetas": parse_list(args.theta, numeric=True),
    }
    lists.update(parse_grid(args.grid))
    return lists


def cmd_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from llmrank.data import bos_token_id, calibration_tokens
    from llmrank.sweep import EvalSpec, expand_cells, markdown, parse_list, run_sweep

    _check_ppl_window(args.seq_len, args.stride)
    lists = _sweep_lists(args)
    cells = expand_cells(lists["scorers"], lists["sparsities"], representations=lists["representations"],
                         compensations=lists["compensations"], gammas=lists["gammas"], thetas=lists["thetas"],
                         compensation_samples=0 if args.compensation_samples == args.samples else args.compensation_samples,
                         **{k: lists[k] for k in ("allocations", "selections", "refit_inputs") if k in lists})
    n_tokens = parse_tokens(args.ppl_tokens)
    tasks = parse_tasks(args.tasks)
    if n_tokens == 0 and not tasks:
        raise ValueError("nothing to evaluate: --ppl-tokens 0 and --tasks none")
    if args.samples < 1 or args.calib_seq_len < 1 or args.compensation_samples < 1:
        raise ValueError("--samples, --compensation-samples and --calib-seq-len must be >= 1")
    _set_threads(args)
    progress = not (args.quiet or args.json)
    log = (lambda s: None) if not progress else print
    model, tokenizer, _ = load_torch_model(args.model)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer")
    from llmrank.models import check_seq_len

    check_seq_len(model.config, args.calib_seq_len, option="--calib-seq-len")
    if n_tokens != 0:
        check_seq_len(model.config, args.seq_len)
    calib = calibration_tokens(tokenizer, args.calib, n=args.samples, seq_len=args.calib_seq_len, seed=args.seed)
    refit = None
    if any(c.compensation_samples for c in cells):
        refit = calibration_tokens(tokenizer, args.calib, n=args.compensation_samples, seq_len=args.calib_seq_len, seed=args.seed)
    if args.ppl_split == "tune":
        ids, protocol = tune_stream(tokenizer, args, n_tokens)
    else:
        ids, protocol = ppl_stream(tokenizer, args.ppl_source, n_tokens)
    more_ppl = {}
    for name in parse_list(args.ppl_also) if args.ppl_also else []:
        more_ids, more_protocol = ppl_stream(tokenizer, name, n_tokens)
        if more_ids is not None:
            more_ppl[name] = more_ids
            protocol[f"also_{name}"] = f"{more_protocol['tokens_used']} tokens of {more_protocol['split']}"
    bos = bos_token_id(tokenizer)
    if bos is not None:
        protocol["bos"] = "BOS in front of every window"
    spec = EvalSpec(
        bos_token_id=bos, ppl_tokens=ids, more_ppl=more_ppl, seq_len=args.seq_len, stride=args.stride, tasks=load_items(tasks, args.limit, args.seed),
        tokenizer=tokenizer, batch_size=args.batch_size,
        protocol={"model": args.model, "ppl_seq_len": args.seq_len, "ppl_stride": args.stride or args.seq_len,
                  **{f"ppl_{k}": v for k, v in protocol.items()}, "tasks": ",".join(tasks) or "none",
                  "task_limit": args.limit, "calibration": f"{args.samples}x{args.calib_seq_len} tokens of {args.calib} (calib split)",
                  "pruner": args.pruner, "seed": args.seed},
    )
    log(f"sweep: {len(cells)} cells + dense into {args.out}")
    result = run_sweep(
        model, cells, args.out, calibration=calib, spec=spec, compensation_calibration=refit, pruner=args.pruner, multiple=args.multiple, seed=args.seed,
        settings={"model": args.model, "calib": args.calib, "samples": args.samples, "calib_seq_len": args.calib_seq_len},
        progress=progress, log=log, plots=not args.no_plots,
    )
    _say(args, "\n" + markdown(result.rows, spec))
    _say(args, f"\nwritten: {', '.join(sorted(result.files.values()))}")
    return {"out": str(args.out), "computed": result.computed, "files": result.files, "rows": result.rows}
