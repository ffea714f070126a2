"""`export --out DIR/` writes DIR/model.onnx, and --quiet is quiet without changing the process
for later commands (issue 14, item 13)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from llmrank import cli
from llmrank.cli import main
from llmrank.exporters.onnx import onnx_target


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, "cat": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    return folder


def test_onnx_target_folder_or_file(tmp_path):
    assert onnx_target(f"{tmp_path}/new/") == tmp_path / "new" / "model.onnx"  # trailing slash: a folder
    assert onnx_target(tmp_path) == tmp_path / "model.onnx"  # an existing folder
    assert onnx_target(tmp_path / "slim.onnx") == tmp_path / "slim.onnx"
    assert onnx_target(str(tmp_path / "new")) == tmp_path / "new"  # no slash, not there: the file name given


def test_export_into_a_new_folder_quietly(llama_folder, tmp_path, capfd):
    out = tmp_path / "newdir"
    capfd.readouterr()
    assert main(["export", str(llama_folder), "--out", f"{out}/", "--no-kv-cache", "--quiet"]) == 0
    assert out.is_dir() and sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # no torch.onnx warnings, no progress bars
    # the folder exists now: without the slash it is still a folder, and the file in it is refused
    assert main(["export", str(llama_folder), "--out", str(out), "--no-kv-cache", "--quiet"]) == 2
    assert "model.onnx already exists" in capfd.readouterr().err


def test_inspect_quiet_prints_no_progress_bar(llama_folder, capfd):
    capfd.readouterr()
    assert main(["inspect", str(llama_folder), "--quiet"]) == 0
    captured = capfd.readouterr()
    assert captured.out == "" and "Loading weights" not in captured.err and "%|" not in captured.err
    assert captured.err == ""


def _noisy(args):
    """A stand-in command that does what third-party code does: a bar, a warning, a log line."""
    from tqdm import tqdm

    for _ in tqdm(range(3), desc="third-party bar"):
        pass
    warnings.warn("third-party warning", UserWarning)
    logging.getLogger("some.library").warning("third-party log line")
    return {}


def test_quiet_silences_third_party_output_only_for_the_command(monkeypatch, capfd, caplog):
    monkeypatch.setitem(cli.COMMANDS, "inspect", _noisy)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    filters = list(warnings.filters)
    verbosity = transformers.logging.get_verbosity()
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["inspect", "anything", "--quiet"]) == 0
    assert seen == [] and caplog.records == [] and capfd.readouterr().err == ""
    assert warnings.filters == filters and transformers.logging.get_verbosity() == verbosity
    assert "TQDM_DISABLE" not in os.environ and logging.root.manager.disable == logging.NOTSET
    with pytest.warns(UserWarning, match="third-party warning"):
        assert main(["inspect", "anything"]) == 0  # without --quiet nothing is hidden
    assert "third-party bar" in capfd.readouterr().err and "third-party log line" in caplog.text
    assert warnings.filters == filters
