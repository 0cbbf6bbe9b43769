"""hpllm.outputs.check_output: the one rule "never write over anything the command did not
create", case by case."""

import json

import pytest

from hpllm.errors import PathError, UserError
from hpllm.outputs import check_output


def _earlier(path):
    return (path / "made-by-us").is_file()


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "input" / "checkpoints" / "step_000001").mkdir(parents=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "made-by-us").write_text("")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model": {}, "step": 3}))
    (tmp_path / "ckpt" / "made-by-us").write_text("")
    return tmp_path


def _check(tree, out, **kwargs):
    kwargs.setdefault("inputs", [tree / "input"])
    return check_output(str(tree / out) if out else "", replaceable=_earlier,
                        kind="conversion", **kwargs)


@pytest.mark.parametrize(("out", "force", "message"), [
    ("", False, "--out is empty"),
    ("input", True, "is the input"),
    ("input/checkpoints/step_000001", True, "is inside the input"),
    ("input/new", True, "is inside the input"),
    (".", True, "contains the input"),
    ("mine", False, "holds files this command did not write"),
    ("mine", True, "holds files this command did not write"),
    ("earlier", False, "already holds a conversion; choose a new path, or pass --force"),
    ("file", True, "exists and is not a folder"),
    ("dangling", True, "is a link to nothing"),
    ("run", True, "is a training run or checkpoint; it is never replaced"),
    ("ckpt", True, "is a training run or checkpoint"),
])
def test_refusals(tree, out, force, message):
    with pytest.raises(UserError, match=message):
        _check(tree, out, force=force)
    assert (tree / "mine" / "notes.txt").read_text() == "precious"


def test_other_spellings_of_the_input_are_the_input(tree):
    (tree / "alias").symlink_to(tree / "input")
    with pytest.raises(UserError, match="is the input"):
        _check(tree, "alias")
    with pytest.raises(UserError, match="is inside the input"):
        _check(tree, "mine/../input/x")


def test_a_path_under_a_file_is_refused_before_any_work(tree):
    with pytest.raises(PathError, match=r"cannot write .*file/out: Not a directory; .*file is a"):
        _check(tree, "file/out")


@pytest.mark.parametrize(("out", "force", "replaces"), [
    ("new", False, False),
    ("new/deeper", False, False),
    ("empty", False, True),
    ("earlier", True, True),
])
def test_what_is_allowed_and_whether_it_replaces(tree, out, force, replaces):
    assert _check(tree, out, force=force) is replaces


def test_a_command_without_force_names_no_flag(tree):
    with pytest.raises(UserError, match=r"already holds a conversion; choose a new path$"):
        _check(tree, "earlier", force_flag=None)
