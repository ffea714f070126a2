"""Text for calibration and perplexity: the built-in `wiki` and `botchan` texts and seeded window sampling.

No dataset hub is reachable, so the built-in corpus is the ~100 real English Wikipedia
articles that ship inside the gensim package (read from the installed package or its wheel,
never vendored). Calibration and evaluation use disjoint article sets so that a pruning
method cannot be scored on the text it was calibrated on. The second built-in text, `botchan`,
is a novel (Natsume's *Botchan* in English, Project Gutenberg, public domain) from the test
data of sentencepiece's source package: prose of another kind and century, to check that a
pruned model did not just fit the calibration corpus.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.util
import json
import re
import tarfile
import weakref
import xml.etree.ElementTree as ET
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import torch

from llmrank.cache import atomic_file, cache_dir, pip_download
from llmrank.ir.errors import InputError

__all__ = [
    "SPLITS",
    "wiki_articles",
    "wiki_text",
    "botchan_text",
    "BUILTIN_TEXTS",
    "clean_wikitext",
    "load_text_source",
    "sample_sequences",
    "calibration_tokens",
    "eval_tokens",
    "tuning_tokens",
    "tokenize_text",
    "bos_token_id",
    "TextSourceError",
    "TextEncodingError",
]

_SOURCE_HINT = "--calib / --ppl-source take 'wiki', 'botchan', a .txt file, a folder of .txt files or a dataset name"


class TextSourceError(InputError, FileNotFoundError):
    """A text source that names a file or folder that is not there."""

    hint = _SOURCE_HINT


class TextEncodingError(InputError):
    """A text file that is not UTF-8; the message names the file and the first bad byte."""

    hint = "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8 IN.txt > OUT.txt"


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TextEncodingError(f"text file {path} is not UTF-8 ({exc.reason} at byte {exc.start}); "
                                f"convert it to UTF-8") from None


def _looks_like_path(source: str) -> bool:
    """A name the user meant as a file or folder rather than a dataset id: it has a suffix,
    starts with ./ ../ / or ~, or has a slash under a folder that exists here."""
    path = Path(source).expanduser()
    return bool(path.suffix) or source.startswith((".", "/", "~")) or ("/" in source and path.parent.is_dir())

SPLITS = ("calib", "eval")
_DUMP_IN_PACKAGE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_GENSIM_SPEC = "gensim==4.4.0"
_PARSER_VERSION = 1  # bump when the cleaning rules change: it keys the JSON cache
_MIN_ARTICLE_WORDS = 200
_MIN_PARAGRAPH_WORDS = 8

# ---------------------------------------------------------------------------------------------
# Locating the dump


def _dump_bytes() -> bytes:
    """Compressed dump bytes: from the installed gensim package, else from its wheel."""
    spec = importlib.util.find_spec("gensim")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / _DUMP_IN_PACKAGE
        if path.is_file():
            return path.read_bytes()
    wheel = pip_download(_GENSIM_SPEC)
    with zipfile.ZipFile(wheel) as zf:
        return zf.read("gensim/" + _DUMP_IN_PACKAGE)


# ---------------------------------------------------------------------------------------------
# Wiki markup -> plain prose

_END_SECTIONS = {
    "see also", "references", "notes", "further reading", "external links", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "references and notes",
    "works cited", "literature", "notes and sources", "primary sources", "secondary sources",
}
_DROP_LINK_PREFIX = re.compile(r"^\s*:?\s*(file|image|category|media|wikt|wiktionary|[a-z]{2,3}(-[a-z]+)?)\s*:",
                               re.IGNORECASE)
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref(?:\s[^>]*)?>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
_DROP_TAG_BLOCK = re.compile(
    r"<(math|gallery|timeline|imagemap|score|syntaxhighlight|source|pre|chem|ce|hiero|graph|mapframe)"
    r"(?:\s[^>]*)?>.*?</\1\s*>", re.DOTALL | re.IGNORECASE)
_ANY_TAG = re.compile(r"</?[a-zA-Z][^<>]*?/?>")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_BARE_URL = re.compile(r"https?://\S+")
_BOLD_ITALIC = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]+__")


def _replace_balanced(text: str, open_tok: str, close_tok: str, repl: Callable[[str], str]) -> str:
    """Replace every outermost `open_tok ... close_tok` span (nesting-aware) by repl(inner).

    Unbalanced openers are left as they are (the paragraph filter drops such lines later).
    """
    pattern = re.compile(re.escape(open_tok) + "|" + re.escape(close_tok))
    out: list[str] = []
    stack: list[int] = []
    pos = 0  # end of the text already copied to out
    for m in pattern.finditer(text):
        if m.group() == open_tok:
            stack.append(m.start())
        elif stack:
            start = stack.pop()
            if not stack:
                out.append(text[pos:start])
                out.append(repl(text[start + len(open_tok):m.start()]))
                pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def _split_top(inner: str, sep: str = "|") -> list[str]:
    """Split on `sep` outside nested [[...]] / {{...}}."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(inner):
        two = inner[i:i + 2]
        if two in ("[[", "{{"):
            depth += 1
            cur.append(two)
            i += 2
            continue
        if two in ("]]", "}}"):
            depth = max(depth - 1, 0)
            cur.append(two)
            i += 2
            continue
        if inner[i] == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(inner[i])
        i += 1
    parts.append("".join(cur))
    return parts


def _template(inner: str) -> str:
    """Keep the text of the few templates that carry prose (conversions, quotes, language
    tags); drop the rest (infoboxes, citations, navigation boxes)."""
    parts = [p.strip() for p in _split_top(inner)]
    name = parts[0].lower().replace("_", " ")
    args = [p for p in parts[1:] if "=" not in p.split("[[")[0]]
    if name in ("convert", "cvt") and args:
        unit = args[1] if len(args) > 1 and not args[1].replace(".", "").isdigit() else ""
        if len(args) > 2 and args[1] in ("-", "to", "and", "or", "–"):
            return f"{args[0]} {args[1]} {args[2]} {args[3] if len(args) > 3 else ''}".strip()
        return f"{args[0]} {unit}".strip()
    if name.startswith("lang-") and args:
        return args[-1]
    if name in ("lang", "transl", "transliteration") and len(args) >= 2:
        return args[-1]
    if name in ("nowrap", "nobr", "small", "smaller", "big", "em", "strong", "lang", "noitalic",
                "abbr", "sic", "not a typo", "math", "mvar", "var", "ill", "interlanguage link"):
        return args[0] if args else ""
    if name in ("'", "' \"", "\" '"):
        return "'"
    if name in ("snd", "spaced ndash", "spnd", "ndash"):
        return " – "
    if name in ("mdash", "spaced mdash"):
        return " — "
    if name in ("circa", "c.") and args:
        return f"c. {args[0]}"
    if name in ("quote", "blockquote", "cquote", "quotation") and args:
        return "\n" + args[0] + "\n"
    return ""


def _link(inner: str) -> str:
    """[[target|label]] -> label; files, categories and interlanguage links -> nothing."""
    if _DROP_LINK_PREFIX.match(inner):
        return ""
    parts = _split_top(inner)
    label = parts[-1] if len(parts) > 1 else parts[0]
    if len(parts) > 1 and not label.strip():  # pipe trick [[Foo (bar)|]]
        label = re.sub(r"\s*\(.*?\)\s*$", "", parts[0])
    return label.split("#")[-1] if len(parts) == 1 and label.startswith("#") else label


def _is_paragraph(line: str) -> bool:
    """A real prose paragraph: long enough, no leftover markup, ends like a sentence."""
    if len(line.split()) < _MIN_PARAGRAPH_WORDS or line[0] in "*#:;|!{}=":
        return False
    if any(tok in line for tok in ("[[", "]]", "{{", "}}", "{|", "|}", "''", "<", ">", "|", "==", "&#")):
        return False
    if not line[0].isupper() and not line[0].isdigit() and line[0] not in "\"'(“‘":
        return False
    return line.rstrip("\"'”’)]").endswith((".", "!", "?", ":")) or line.endswith((".\"", ".”"))


def _tidy(line: str) -> str:
    """Repair spacing and punctuation left behind by removed references and templates."""
    line = re.sub(r"[ \t\u00a0]+", " ", line).strip()
    line = re.sub(r"\(\s*(?:[,;:]\s*)+", "(", line)       # "(; ;" left by dropped templates
    line = re.sub(r"(?:\s*[,;])+\s*\)", ")", line)
    line = re.sub(r"\(\s*\)", "", line)
    line = re.sub(r"\s+([,.;:!?)])", r"\1", line)
    line = re.sub(r"([(])\s+", r"\1", line)
    line = re.sub(r",\s*,", ",", line)
    line = re.sub(r"\.\s*\.(?!\.)", ".", line)
    return re.sub(r" {2,}", " ", line).strip()


def clean_wikitext(raw: str) -> list[str]:
    """Wiki markup of one article -> its prose paragraphs, in order.

    Stops at the trailing reference sections ("See also", "References", ...), drops
    templates, tables, files, lists and headings, keeps link labels, case and punctuation.
    """
    text = _COMMENT.sub("", raw)
    text = _REF.sub("", text)
    text = _DROP_TAG_BLOCK.sub("", text)
    text = _replace_balanced(text, "{{", "}}", _template)
    text = _replace_balanced(text, "{|", "|}", lambda _: "")
    text = _replace_balanced(text, "[[", "]]", _link)
    text = _EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = _ANY_TAG.sub("", text)
    text = html.unescape(text)
    text = _MAGIC.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _BARE_URL.sub("", text)
    paragraphs: list[str] = []
    for line in text.split("\n"):
        head = _HEADING.match(line.strip())
        if head:
            if head.group(2).strip().lower() in _END_SECTIONS:
                break
            continue
        line = _tidy(line)
        if line and _is_paragraph(line):
            paragraphs.append(line)
    return paragraphs


def _parse_dump(data: bytes) -> list[dict]:
    """All kept articles of the dump, in file order, as {"title", "text"}."""
    root = ET.fromstring(bz2.decompress(data))
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    articles = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        raw = page.findtext(f"{ns}revision/{ns}text") or ""
        if raw.lstrip().lower().startswith("#redirect"):
            continue
        paragraphs = clean_wikitext(raw)
        if sum(len(p.split()) for p in paragraphs) < _MIN_ARTICLE_WORDS:
            continue
        title = page.findtext(f"{ns}title") or ""
        articles.append({"title": title, "text": "\n".join([title, *paragraphs])})
    return articles


@lru_cache(maxsize=1)
def _all_articles() -> tuple[str, ...]:
    """Kept articles in file order; parsed once, cached as JSON keyed by the dump's sha256."""
    data = _dump_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = cache_dir() / "data" / f"wiki-{digest}-v{_PARSER_VERSION}.json"
    if path.is_file():
        try:
            return tuple(a["text"] for a in json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError):
            pass  # corrupt cache: parse again and overwrite
    articles = _parse_dump(data)
    with atomic_file(path, "w") as fh:
        json.dump(articles, fh, ensure_ascii=False)
    return tuple(a["text"] for a in articles)


def wiki_articles(split: str) -> list[str]:
    """Articles of one split: `calib` is the first half in file order, `eval` the second."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    articles = _all_articles()
    half = len(articles) // 2
    return list(articles[:half] if split == "calib" else articles[half:])


def wiki_text(split: str) -> str:
    """One split of the built-in corpus as a single text, articles separated by a blank line."""
    return "\n\n".join(wiki_articles(split))


# ---------------------------------------------------------------------------------------------
# The second built-in text: a novel

_BOTCHAN_SPEC = "sentencepiece==0.2.0"
_BOTCHAN_MEMBER = "sentencepiece-0.2.0/test/botchan.txt"


def _gutenberg_body(raw: str) -> str:
    """The book between Project Gutenberg's START marker and its own end (licence and the
    transcriber's typo list dropped)."""
    start = re.search(r"^\*\*\* ?START OF .*$", raw, flags=re.M)
    end = re.search(r"^--\(THE END\)--|^\*\*\* ?END OF .*$", raw, flags=re.M)
    if start is None or end is None or end.start() <= start.end():
        raise TextSourceError("the botchan text has no Project Gutenberg START/END markers: the sentencepiece sdist changed")
    return raw[start.end():end.start()].strip()


@lru_cache(maxsize=1)
def _botchan_paragraphs() -> tuple[str, ...]:
    """The novel's lines in order, read from sentencepiece's sdist (downloaded once, cached)."""
    path = cache_dir() / "data" / "botchan-v2.txt"
    if not path.is_file():
        sdist = pip_download(_BOTCHAN_SPEC, no_binary=True)
        with tarfile.open(sdist) as tf:
            member = tf.extractfile(_BOTCHAN_MEMBER)
            if member is None:
                raise TextSourceError(f"{sdist.name} has no {_BOTCHAN_MEMBER}")
            body = _gutenberg_body(member.read().decode("utf-8-sig"))
        with atomic_file(path, "w") as fh:
            fh.write(body)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return tuple(line for line in lines if line)


def botchan_text(split: str) -> str:
    """One split of the novel: `calib` is its first half of lines, `eval` the second."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    lines = _botchan_paragraphs()
    half = len(lines) // 2
    return "\n".join(lines[:half] if split == "calib" else lines[half:])


#: Texts that need no file: name -> text of a split.
BUILTIN_TEXTS: dict[str, Callable[[str], str]] = {"wiki": wiki_text, "botchan": botchan_text}


# ---------------------------------------------------------------------------------------------
# Other sources


def load_text_source(source: str, split: str = "calib") -> str:
    """Text from a built-in source (`wiki`, `botchan`: split-aware), a .txt file, a folder of
    .txt files, or a Hugging Face dataset name (needs `datasets` and a reachable hub).

    Files and folders are used whole: `split` only selects within the built-ins and HF datasets.
    """
    if source in BUILTIN_TEXTS:
        return BUILTIN_TEXTS[source](split)
    path = Path(source).expanduser()
    if path.is_file():
        return _read_utf8(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise TextSourceError(f"no .txt files in folder {path}")
        return "\n\n".join(_read_utf8(f) for f in files)
    if _looks_like_path(source):
        raise TextSourceError(f"text source {source!r} does not exist (expected a .txt file or a folder)")
    return _hf_dataset_text(source, split)


def _hf_dataset_text(name: str, split: str) -> str:
    """Join the `text` column of an HF dataset (`name` or `name:config`)."""
    hint = ("Use the built-in source 'wiki', a .txt file, or a folder of .txt files instead.")
    if importlib.util.find_spec("datasets") is None:
        raise RuntimeError(f"text source {name!r} is not 'wiki', a file or a folder, and the "
                           f"`datasets` package is not installed to fetch it from a hub. {hint}")
    import datasets  # type: ignore[import-not-found]

    repo, _, config = name.partition(":")
    hf_split = {"calib": "train", "eval": "test"}.get(split, split)
    try:
        ds = datasets.load_dataset(repo, config or None, split=hf_split)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure gets the same advice
        raise RuntimeError(f"could not load dataset {name!r} split {hf_split!r} (no dataset hub "
                           f"reachable?): {exc}. {hint}") from exc
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(str(t) for t in ds[column] if str(t).strip())


# ---------------------------------------------------------------------------------------------
# Tokens


_TOKEN_CACHE: "weakref.WeakKeyDictionary[object, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` as one 1-D LongTensor, with no special tokens added.

    Tokenizing the whole text once keeps windows free of BOS/EOS in their middle; the result
    is cached per tokenizer object (for as long as it lives) and text.
    """
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()
    try:
        per_tok = _TOKEN_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no caching
        per_tok = {}
    if key not in per_tok:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        per_tok[key] = torch.tensor(ids, dtype=torch.long)
    return per_tok[key]


def sample_sequences(token_ids: Sequence[int] | torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """`n` seeded random windows of `seq_len` contiguous tokens, as LongTensor[n, seq_len]."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if n < 1 or seq_len < 1:
        raise ValueError(f"need n >= 1 and seq_len >= 1, got n={n}, seq_len={seq_len}")
    if ids.numel() < seq_len + 1:
        raise ValueError(f"text too short: {ids.numel()} tokens, need at least seq_len+1 = "
                         f"{seq_len + 1}; use more text or a shorter seq_len")
    starts = _window_starts(ids.numel(), n, seq_len, seed)
    return torch.stack([ids[s:s + seq_len] for s in starts])


def _window_starts(n_ids: int, n: int, seq_len: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n_ids - seq_len, (n,), generator=gen).tolist()


def bos_token_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front of every text by default (Gemma, Llama-2),
    else None (SmolLM2, GPT-2). Such models need BOS at position 0 of every window: Gemma-3's
    perplexity on windows without it is more than twice as high."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - a stand-in tokenizer without special tokens
        return None
    return int(bos) if ids and ids[0] == bos else None


def calibration_tokens(tokenizer, source: str = "wiki", n: int = 16, seq_len: int = 512,
                       seed: int = 0, add_bos: bool | None = None) -> torch.Tensor:
    """Calibration batch LongTensor[n, seq_len] sampled from the calib split of `source`.

    add_bos (None = when the tokenizer adds BOS by default, see bos_token_id): put BOS at
    position 0 of every row, followed by seq_len-1 contiguous text tokens, as the model saw
    its inputs in training.
    """
    ids = tokenize_text(tokenizer, load_text_source(source, "calib"))
    bos = bos_token_id(tokenizer) if add_bos is None else (tokenizer.bos_token_id if add_bos else None)
    if bos is None:
        return sample_sequences(ids, n, seq_len, seed)
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 to hold BOS and text, got {seq_len}")
    rows = sample_sequences(ids, n, seq_len - 1, seed)
    return torch.cat([torch.full((n, 1), int(bos), dtype=torch.long), rows], dim=1)


def tuning_tokens(tokenizer, source: str = "wiki", n: int = 16, seq_len: int = 512, seed: int = 0,
                  add_bos: bool | None = None) -> torch.Tensor:
    """The calib split of `source` with every token that `calibration_tokens(tokenizer, source,
    n, seq_len, seed, add_bos)` samples taken out, as LongTensor[1, T].

    Hyper-parameters are chosen on this text: it is disjoint from both the calibration windows
    (no fitting to the samples) and the eval split (no peeking at the reported numbers).
    """
    ids = tokenize_text(tokenizer, load_text_source(source, "calib"))
    bos = bos_token_id(tokenizer) if add_bos is None else (tokenizer.bos_token_id if add_bos else None)
    width = seq_len - 1 if bos is not None else seq_len
    used = torch.zeros(ids.numel(), dtype=torch.bool)
    for start in _window_starts(ids.numel(), n, width, seed):
        used[start:start + width] = True
    return ids[~used].unsqueeze(0)


def eval_tokens(tokenizer, source: str = "wiki") -> torch.Tensor:
    """The eval split of `source` as one token stream, LongTensor[1, T], without special tokens
    (an evaluator adds BOS per window where bos_token_id(tokenizer) says so)."""
    return tokenize_text(tokenizer, load_text_source(source, "eval")).unsqueeze(0)


def heal_tokens(tokenizer, source: str = "wiki", n: int = 64, seq_len: int = 512, seed: int = 0, *,
                held_out: int = 4096, exclude: int = 64, add_bos: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows LongTensor[n, seq_len], held-out text LongTensor[1, held_out]) for a heal,
    both from the calib split of `source` (never the eval split).

    The held-out text is the first `held_out` tokens of `tuning_tokens(..., n=exclude)` (the
    calib split minus the `exclude` pruning calibration windows); the training windows are
    sampled (seeded) from the rest of it, so the heal's perplexity curve reads text that
    neither the pruning nor the heal trained on. Rows start with BOS where the tokenizer adds
    one (see calibration_tokens).
    """
    tune = tuning_tokens(tokenizer, source, n=exclude, seq_len=seq_len, seed=seed, add_bos=add_bos)[0]
    if tune.numel() < held_out + seq_len + 1:
        raise ValueError(f"text too short to heal on: {tune.numel()} tokens outside the calibration windows, need at least "
                         f"{held_out + seq_len + 1} (held_out + seq_len + 1); use more text, a shorter --seq-len or fewer held-out tokens")
    held, rest = tune[:held_out].unsqueeze(0), tune[held_out:]
    bos = bos_token_id(tokenizer) if add_bos is None else (tokenizer.bos_token_id if add_bos else None)
    if bos is None:
        return sample_sequences(rest, n, seq_len, seed), held
    rows = sample_sequences(rest, n, seq_len - 1, seed)
    return torch.cat([torch.full((n, 1), int(bos), dtype=torch.long), rows], dim=1), held
