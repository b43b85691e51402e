"""ltdist.entry: one exit contract for every command (a user error exits 2 with one line, a bug
keeps its traceback and exits 1), and the error classes that are user errors."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from ltdist import entry
from ltdist.config import ConfigError, load_config

pytestmark = pytest.mark.both_envs


def test_a_user_error_exits_2_with_one_line(capsys):
    def main():
        raise ConfigError("configs/x.yaml: loader.batch_size: must be >= 1")

    assert entry.run("prog", main) == 2
    err = capsys.readouterr().err
    assert err == "prog: error: configs/x.yaml: loader.batch_size: must be >= 1\n"


@pytest.mark.parametrize("bug", [RuntimeError, ValueError, KeyError, FileNotFoundError])
def test_anything_else_is_not_caught(bug):
    # a plain ValueError (or a missing file the code itself opens) is a bug: Python prints its
    # traceback and exits 1
    def main():
        raise bug("inside the code")

    with pytest.raises(bug, match="inside the code"):
        entry.run("prog", main)


def test_debug_shows_a_user_errors_traceback(capsys, monkeypatch):
    monkeypatch.setenv(entry.DEBUG_ENV, "1")

    def main():
        raise entry.InputError("bad input")

    assert entry.run("prog", main) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("prog: error: bad input\n")


def test_status_passes_through():
    assert entry.run("prog", lambda: None) == 0
    assert entry.run("prog", lambda: 1) == 1


def test_errors_users_fix_are_user_errors():
    from ltdist.data.manifest import ManifestError
    from ltdist.data.pack import ImageError, PackError
    from ltdist.data.shards import ShardIntegrityError
    from ltdist.data.splits import BenchmarkFileError, ChecksumError, FetchError
    from ltdist.labels import UnknownClassError
    from ltdist.stag.config import StagError
    from ltdist.stag.grammar import GrammarError
    from ltdist.stag.llm_assets import AssetError
    from ltdist.stag.prompt import ChatTemplateError
    from ltdist.storage import UntrustedLocationError

    for cls in (
        ConfigError, BenchmarkFileError, ChecksumError, FetchError, ManifestError, ImageError,
        PackError, ShardIntegrityError, UnknownClassError, StagError, GrammarError, AssetError,
        ChatTemplateError, UntrustedLocationError, entry.InputError, entry.MissingInputError,
    ):  # fmt: skip
        assert issubclass(cls, entry.UserError), cls
    # the builtin base each had stays, for callers that catch it
    assert issubclass(ConfigError, ValueError) and issubclass(UnknownClassError, KeyError)
    assert str(UnknownClassError("unknown class 'dgo'")) == "unknown class 'dgo'"  # unquoted


def test_a_fields_own_check_is_a_config_error_naming_the_file(tmp_path):
    from ltdist.stag.config import StagConfig

    path = tmp_path / "stag.yaml"
    path.write_text("validation:\n  min_words: 90\n  max_words: 80\n")
    with pytest.raises(ConfigError, match=rf"{path}: validation: ValidationConfig: need 0 <="):
        load_config(StagConfig, path)


def test_logging_is_set_up_once():
    # a fresh interpreter: pytest's own log capture holds the root logger here
    code = (
        "import logging; from ltdist import entry; entry.setup_logging(); "
        "entry.setup_logging(verbose=True); entry.setup_logging(); r = logging.getLogger(); "
        "print(len(r.handlers), r.level)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", str(logging.DEBUG)]  # one handler; the lowest level kept
