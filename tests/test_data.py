"""The built-in wiki corpus, window sampling and the atomic cache helpers."""

from __future__ import annotations

import re

import pytest
import torch

from llmrank import data
from llmrank.cache import atomic_dir, atomic_file


@pytest.fixture(scope="module")
def splits() -> dict[str, list[str]]:
    return {s: data.wiki_articles(s) for s in data.SPLITS}


def test_splits_disjoint_and_cover_all_articles(splits):
    calib, ev = splits["calib"], splits["eval"]
    everything = list(data._all_articles())
    assert len(everything) >= 80  # ~94 real articles survive the filters
    assert calib and ev
    assert not set(calib) & set(ev)
    assert calib + ev == everything  # first half / second half, in file order
    assert abs(len(calib) - len(ev)) <= 1
    titles = [a.split("\n", 1)[0] for a in everything]
    assert len(set(titles)) == len(titles)
    assert not {a.split("\n", 1)[0] for a in calib} & {a.split("\n", 1)[0] for a in ev}


def test_split_is_deterministic(splits):
    data._all_articles.cache_clear()  # re-read through the JSON cache
    assert data.wiki_articles("calib") == splits["calib"]
    assert data.wiki_articles("eval") == splits["eval"]


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="split"):
        data.wiki_articles("train")


@pytest.mark.parametrize("split", data.SPLITS)
def test_text_is_clean_english_prose(split):
    text = data.wiki_text(split)
    words = text.split()
    assert len(words) > 100_000  # each half is WikiText-2 sized
    for markup in ("[[", "]]", "{{", "}}", "'''", "''", "<ref", "</", "&nbsp;", "&amp;", "http://", "|"):
        assert markup not in text, markup
    assert not re.search(r"^=+.*=+$", text, re.MULTILINE)  # no heading markup
    # real case and punctuation, not gensim's lower-cased bag of words
    assert sum(w[0].isupper() for w in words) / len(words) > 0.08
    assert text.count(". ") > 5_000 and text.count(", ") > 5_000
    assert "Anarchism is a political philosophy" in data.wiki_text("calib")
    for article in data.wiki_articles(split):
        title, *paragraphs = article.split("\n")
        assert paragraphs and all(p[-1] in ".!?:\"')”’]" for p in paragraphs), title


def test_clean_wikitext_strips_markup():
    raw = ("{{Infobox thing|name=X}}\n'''Foo''' is a [[bar (baz)|bar]] from [[Qux]] "
           "({{convert|5|km}}).<ref>{{cite web|url=http://x.org}}</ref> It is [http://y.org nice].\n"
           "* a list item that is not prose at all here\n"
           "[[File:Foo.jpg|thumb|A caption with [[link]].]]\n"
           "{| class=\"wikitable\"\n|-\n| cell || cell\n|}\n"
           "== References ==\nThis paragraph is after the references heading and must go.\n")
    assert data.clean_wikitext(raw) == ["Foo is a bar from Qux (5 km). It is nice."]


def test_load_text_source_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "skip.md").write_text("not text")
    assert data.load_text_source(str(tmp_path / "a.txt")) == "first file"
    assert data.load_text_source(str(tmp_path)) == "first file\n\nsecond file"
    assert data.load_text_source("wiki", "eval") == data.wiki_text("eval")
    with pytest.raises(FileNotFoundError):
        data.load_text_source(str(tmp_path / "missing.txt"))


def test_non_utf8_text_names_the_file(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    for source in (bad, tmp_path):  # the file itself, and the folder that holds it
        with pytest.raises(data.TextEncodingError, match="not UTF-8") as err:
            data.load_text_source(str(source))
        assert str(bad) in str(err.value) and "byte 3" in str(err.value)
        assert isinstance(err.value, ValueError) and "iconv" in err.value.hint


@pytest.mark.parametrize("name", ["missing.txt", "sub/missing", "./missing"])
def test_missing_text_source_is_a_text_error(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(data.TextSourceError, match="does not exist") as err:
        data.load_text_source(name)
    assert isinstance(err.value, FileNotFoundError)
    assert "--calib" in err.value.hint and "model" not in err.value.hint


STREAM = torch.arange(1000, 2000)  # a token stream whose values give their own positions


def test_sample_sequences_deterministic_and_seeded():
    a = data.sample_sequences(STREAM, 8, 32, seed=0)
    b = data.sample_sequences(STREAM.tolist(), 8, 32, seed=0)
    c = data.sample_sequences(STREAM, 8, 32, seed=1)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_sequences_are_contiguous_slices():
    stream = torch.randint(0, 50, (3000,), generator=torch.Generator().manual_seed(3))
    windows = data.sample_sequences(stream, 16, 64, seed=7)
    for w in windows:
        starts = [s for s in range(len(stream) - 63) if torch.equal(stream[s:s + 64], w)]
        assert starts, "window is not a slice of the stream"
    # with a strictly increasing stream the start is unique and every window is consecutive
    for w in data.sample_sequences(STREAM, 16, 64, seed=7):
        start = int(w[0]) - 1000
        assert torch.equal(w, STREAM[start:start + 64])
        assert start + 64 <= len(STREAM) - 1  # room for the next-token target


def test_sample_sequences_too_short_is_an_error():
    with pytest.raises(ValueError, match="too short"):
        data.sample_sequences(torch.arange(10), 2, 10, seed=0)
    data.sample_sequences(torch.arange(11), 2, 10, seed=0)  # seq_len + 1 is enough


class _CharTokenizer:
    """Stand-in tokenizer: one id per character, so the tests need no real model."""

    name_or_path = "char"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_calibration_and_eval_tokens_come_from_their_splits():
    tok = _CharTokenizer()
    calib = data.calibration_tokens(tok, n=4, seq_len=128, seed=0)
    assert calib.shape == (4, 128)
    calib_text, eval_text = data.wiki_text("calib"), data.wiki_text("eval")
    for row in calib:
        window = "".join(map(chr, row.tolist()))
        assert window in calib_text
    assert torch.equal(calib, data.calibration_tokens(tok, n=4, seq_len=128, seed=0))
    ev = data.eval_tokens(tok)
    assert ev.shape == (1, len(eval_text))
    assert "".join(map(chr, ev[0, :200].tolist())) == eval_text[:200]


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "weights.bin").write_text("partial")
            raise RuntimeError("conversion failed")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_and_file_publish_on_success(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not final.exists()
    assert (final / "config.json").read_text() == "{}"
    with atomic_dir(final) as tmp:  # replacing an existing folder
        (tmp / "config.json").write_text("{\"v\": 2}")
    assert (final / "config.json").read_text() == "{\"v\": 2}"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    target = tmp_path / "x.json"
    with pytest.raises(KeyError):
        with atomic_file(target, "w") as fh:
            fh.write("partial")
            raise KeyError("boom")
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == ["model"]
    with atomic_file(target, "w") as fh:
        fh.write("done")
    assert target.read_text() == "done"


class _BosCharTokenizer(_CharTokenizer):
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        ids = super().__call__(text)["input_ids"]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_calibration_puts_bos_first_when_the_tokenizer_does():
    assert data.bos_token_id(_CharTokenizer()) is None
    tok = _BosCharTokenizer()
    assert data.bos_token_id(tok) == 1
    batch = data.calibration_tokens(tok, n=3, seq_len=64, seed=5)
    assert batch.shape == (3, 64) and (batch[:, 0] == 1).all()
    assert (batch[:, 1:] != 1).all()  # no BOS inside the text part
    calib_text = data.wiki_text("calib")
    assert all("".join(map(chr, row[1:].tolist())) in calib_text for row in batch)
    plain = data.calibration_tokens(tok, n=3, seq_len=64, seed=5, add_bos=False)
    assert (plain[:, 0] != 1).all()
    assert torch.equal(data.calibration_tokens(_CharTokenizer(), n=3, seq_len=64, seed=5),
                       data.calibration_tokens(_CharTokenizer(), n=3, seq_len=64, seed=5, add_bos=False))


@pytest.mark.slow
def test_real_tokenizer_calibration_batch():
    from llmrank.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    batch = data.calibration_tokens(tok, n=4, seq_len=256, seed=0)
    assert batch.shape == (4, 256)
    stream = data.tokenize_text(tok, data.wiki_text("calib"))
    assert stream.numel() > 150_000
    assert tok.decode(batch[0])  # decodes to text
    assert torch.equal(batch, data.sample_sequences(stream, 4, 256, seed=0))
    assert data.bos_token_id(tok) is None  # SmolLM2 adds no BOS
    gemma = load_tokenizer("gemma3-270m")
    assert data.bos_token_id(gemma) == 2
    assert (data.calibration_tokens(gemma, n=2, seq_len=64, seed=0)[:, 0] == 2).all()


@pytest.mark.parametrize("tok", [_CharTokenizer(), _BosCharTokenizer()], ids=["plain", "bos"])
def test_tuning_tokens_are_the_calib_split_minus_the_calibration_windows(tok):
    calib = data.calibration_tokens(tok, n=6, seq_len=2000, seed=3)
    tune = data.tuning_tokens(tok, n=6, seq_len=2000, seed=3)
    stream = data.tokenize_text(tok, data.wiki_text("calib"))
    text_part = calib[:, 1:] if data.bos_token_id(tok) is not None else calib
    # Rebuild the mask independently: every calibration row is a slice of the stream.
    used = torch.zeros(stream.numel(), dtype=torch.bool)
    text = "".join(map(chr, stream.tolist()))
    for row in text_part:
        start = text.find("".join(map(chr, row.tolist())))
        assert start >= 0
        used[start:start + row.numel()] = True
    assert torch.equal(tune[0], stream[~used])
    assert stream.numel() - tune.shape[1] <= text_part.numel()  # windows may overlap, never more
    assert torch.equal(tune, data.tuning_tokens(tok, n=6, seq_len=2000, seed=3))
