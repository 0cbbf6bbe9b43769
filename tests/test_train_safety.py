"""`python -m train` loses nothing: run folders it did not create, concurrent runs, OS errors,
runs stopped before their first checkpoint, damaged checkpoints, bad JSON and bad numbers."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_train_cli import (
    REPO,
    expect_error,
    fast,
    metrics,
    small_tokenizer,
    snapshot,
)

from hpllm.checkpoint import latest_checkpoint
from hpllm.errors import UserError
from train.cli import main, parse
from train.settings import FIELDS, flag, value_type


def expect_failure(argv: list[str], match: str, capsys) -> str:
    """Like expect_error, for a failure after training started: the progress lines printed
    before it stay, the error is the last line, and there is no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    assert match in last, err
    return last


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    return small_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tokenizer_file) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4, trained once per module."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(fast(out, tokenizer_file, "--steps", "4", "--save-every", "2", "--keep",
                     "0")) == 0
    return out


@pytest.fixture
def existing_run(tmp_path, trained_run) -> Path:
    """A copy of `trained_run` for one test to change."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


# --------------------------------------------------------------------------- what --out may be


def test_out_that_is_not_a_run_folder_is_refused(tmp_path, tokenizer_file, capsys):
    """A non-empty folder we did not create, the data folder, or a folder inside it."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text("my own notes\n")
    (mine / "tokenizer.json").write_text("{}")
    (tmp_path / "tok").mkdir()
    shutil.copy(tokenizer_file, tmp_path / "tok" / "t.json")
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "a.txt").write_text("some text\n\nmore text\n\n" * 50)
    for out, extra, match in [
        (mine, [], "not a training run"),
        (data, ["--data", str(data)], "the training data"),
        (data / "runs" / "x", ["--data", str(data)], "the training data"),
        (tmp_path, ["--data", str(data)], "the training data"),
        (tmp_path / "tok", ["--tokenizer", str(tmp_path / "tok" / "t.json")], "--tokenizer"),
        (tmp_path / "tok" / "t.json", ["--tokenizer", str(tmp_path / "tok" / "t.json")],
         "--tokenizer"),
    ]:
        before = snapshot(tmp_path)
        expect_error([*fast(out, tokenizer_file, "--steps", "1"), *extra], match, capsys)
        assert snapshot(tmp_path) == before


def test_empty_existing_folder_is_fine(tmp_path, tokenizer_file):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(fast(out, tokenizer_file, "--steps", "1")) == 0


# --------------------------------------------------------------------------- no dead ends


def test_run_stopped_before_its_first_checkpoint_can_start_again(tmp_path, tokenizer_file,
                                                                 capsys):
    """A NaN before the first save leaves config.json and tokenizer.json but no checkpoint:
    --resume starts
    from step 0 with the saved settings, a plain rerun reuses the folder; both equal a run
    that never failed."""
    reference = tmp_path / "reference"
    assert main(fast(reference, tokenizer_file, "--steps", "3", "--seed", "5")) == 0
    capsys.readouterr()
    for how in ("resume", "rerun"):
        out = tmp_path / how
        err = expect_failure(fast(out, tokenizer_file, "--steps", "3", "--seed", "5", "--lr",
                                "3e38"), "non-finite", capsys)
        assert "no checkpoint" in err and "--resume" in err, err
        assert (out / "config.json").exists() and latest_checkpoint(out) is None
        if how == "resume":
            # Settings come from the run folder; --lr may change on resume.
            argv = ["--out", str(out), "--resume", "--lr", "1e-3"]
        else:
            argv = fast(out, tokenizer_file, "--steps", "3", "--seed", "5")
        assert main(argv) == 0
        capsys.readouterr()
        assert metrics(out) == [{**m, "tokens_per_s": r["tokens_per_s"]}
                                for m, r in zip(metrics(reference), metrics(out), strict=True)]
        assert json.loads((out / "config.json").read_text())["train"]["seed"] == 5


def test_nan_advice_names_the_newest_checkpoint(tmp_path, existing_run, capsys):
    capsys.readouterr()
    err = expect_failure(["--out", str(existing_run), "--resume", "--steps", "6", "--lr", "3e38"],
                       "non-finite", capsys)
    assert "step_000004" in err and "--resume-from" in err, err


# --------------------------------------------------------------------------- one writer


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the run folder's lock until killed."""
    code = ("import sys, time; from hpllm.locking import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO}"})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_on_the_same_run_is_refused(tmp_path, existing_run, tokenizer_file,
                                                   capsys):
    holder = hold_lock(existing_run)
    capsys.readouterr()
    try:
        before = snapshot(existing_run)
        err = expect_error(["--out", str(existing_run), "--resume", "--steps", "6"],
                           f"PID {holder.pid}", capsys)
        assert str(existing_run) in err
        assert snapshot(existing_run) == before
    finally:
        holder.kill()
        holder.communicate()
    # A killed holder releases the lock.
    assert main(["--out", str(existing_run), "--resume", "--steps", "5"]) == 0
    assert metrics(existing_run)[-1]["step"] == 5


# --------------------------------------------------------------------------- OS errors


def mount_tmpfs(mount_point: Path, options: str) -> Path:
    """Mount a tmpfs (we run as root in CI); skip where mounting is not permitted."""
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip()})")
    return mount_point


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 12 MiB tmpfs: room for a run folder and a few tiny-preset checkpoints (~2 MB each)."""
    yield mount_tmpfs(tmp_path / "tmpfs", "size=12m")
    subprocess.run(["umount", "-l", str(tmp_path / "tmpfs")], check=True)


def fill(folder: Path) -> None:
    """Take every free byte of the file system of `folder`."""
    with open(folder / "filler", "wb", buffering=0) as f:
        while True:
            try:
                if not f.write(b"\0" * 65536):
                    return
            except OSError:
                return


def test_full_disk_at_a_save_keeps_earlier_checkpoints(small_tmpfs, tokenizer_file, capsys):
    """The disk fills up while a checkpoint is written: one error line, the temporary folder
    is gone, every earlier checkpoint still loads; with space again, --resume carries on."""
    out = small_tmpfs / "run"
    assert main(fast(out, tokenizer_file, "--steps", "2", "--save-every", "1", "--keep",
                     "0")) == 0
    before = snapshot(out / "checkpoints")
    capsys.readouterr()
    # Room for the metrics lines and config files, not for a 2 MB checkpoint.
    (small_tmpfs / "slack").write_bytes(b"\0" * 256 * 1024)
    fill(small_tmpfs)
    (small_tmpfs / "slack").unlink()
    err = expect_failure(["--out", str(out), "--resume", "--steps", "4"], "No space left",
                         capsys)
    assert "step_000003" in err, err
    assert snapshot(out / "checkpoints") == before  # no temporary folder left, nothing lost
    (small_tmpfs / "filler").unlink()
    assert main(["--out", str(out), "--resume", "--steps", "4"]) == 0
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


@pytest.fixture
def read_only_tmpfs(tmp_path):
    yield mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    subprocess.run(["umount", "-l", str(tmp_path / "ro")], check=True)


def test_unwritable_out_is_one_line(tmp_path, read_only_tmpfs, tokenizer_file,
                                   capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out, reason in [(a_file / "run", "Not a directory"),
                        (read_only_tmpfs / "run", "Read-only file system"),
                        (Path("/proc/hpllm-run"), "")]:
        err = expect_error(fast(out, tokenizer_file, "--steps", "1"), str(out), capsys)
        assert reason in err, err


def test_immutable_checkpoints_folder_is_one_line(existing_run, capsys):
    folder = existing_run / "checkpoints"
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        before = snapshot(folder)
        expect_failure(["--out", str(existing_run), "--resume", "--steps", "6"],
                       "Operation not permitted", capsys)
        assert snapshot(folder) == before
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


# --------------------------------------------------------------------------- damaged checkpoints


def test_resume_skips_a_damaged_newest_checkpoint(existing_run, capsys):
    newest = latest_checkpoint(existing_run)
    model = newest / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-100])
    assert main(["--out", str(existing_run), "--resume", "--steps", "5"]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "step_000004" in err and "model.safetensors" in err, err
    # It continued from step 2: steps 3.. were run again and logged once each.
    assert [m["step"] for m in metrics(existing_run)] == [1, 2, 3, 4, 5]


def test_resume_from_picks_a_checkpoint(tmp_path, existing_run, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(existing_run, copy)
    assert main(["--out", str(existing_run), "--resume-from", "2"]) == 0
    assert main(["--out", str(copy), "--resume-from",
                 str(copy / "checkpoints" / "step_000002")]) == 0
    for run in (existing_run, copy):
        assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    assert ([m["loss"] for m in metrics(existing_run)] == [m["loss"] for m in metrics(copy)])
    capsys.readouterr()
    expect_error(["--out", str(existing_run), "--resume-from", "3"], "step_000003", capsys)


# --------------------------------------------------------------------------- JSON types


@pytest.mark.parametrize("content, field", [({"preset": ["tiny"]}, "preset"),
                                            ({"dtype": {}}, "dtype"), ({"data": 5}, "data"),
                                            ({"steps": "ten"}, "steps")])
def test_config_file_with_wrong_types(tmp_path, tokenizer_file, capsys, content,
                                      field):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(content))
    err = expect_error(fast(tmp_path / "run", tokenizer_file, "--config", str(config)),
                       str(config), capsys)
    assert repr(field) in err, err


@pytest.mark.parametrize("section, value", [("train.preset", ["tiny"]), ("train.quant", [1]),
                                            ("quant", ["int8"])])
def test_checkpoint_config_with_wrong_types(existing_run, capsys, section, value):
    for checkpoint in (existing_run / "checkpoints").iterdir():
        file = checkpoint / "config.json"
        config = json.loads(file.read_text())
        if "." in section:
            outer, inner = section.split(".")
            config[outer][inner] = value
        else:
            config[section] = value
        # A hand edit breaks the checksum: make it a checkpoint from before manifests, which
        # loads unverified, so the type check itself is what answers.
        config.pop("manifest", None)
        (checkpoint / "manifest.json").unlink()
        file.write_text(json.dumps(config))
    err = expect_error(["--out", str(existing_run), "--resume", "--steps", "6"], "config.json",
                       capsys)
    assert section.split(".")[-1] in err, err


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("extra, match", [
    (["--weight-decay", "nan"], "--weight-decay"), (["--weight-decay", "inf"], "--weight-decay"),
    (["--lr", "1e300"], "--lr must be a number > 0 and at most 3.4e+38"),
    (["--seed", str(2**70)], "--seed"), (["--out", ""], "--out is empty"),
    (["--data", ""], "--data is empty")])
def test_number_and_empty_value_errors(tmp_path, tokenizer_file, capsys, extra,
                                       match):
    argv = fast(tmp_path / "run", tokenizer_file, "--steps", "1")
    if extra[0] == "--out":
        argv = argv[:-2]  # fast() already gave --out
    expect_error([*argv, *extra], match, capsys)
    assert not (tmp_path / "run").exists()


NUMERIC = [name for name, field in FIELDS.items() if value_type(field) in (int, float)]
TEXTS = st.one_of(st.integers(-2**80, 2**80).map(str),
                  st.floats(allow_nan=True, allow_infinity=True).map(repr),
                  st.sampled_from(["", "0", "-0", "1e309", "nan", "-inf", "0x10", "1_000",
                                   " 3", "2.5", "-1"]))


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.tuples(st.sampled_from(NUMERIC), TEXTS), min_size=1, max_size=4))
def test_random_numeric_flags_give_valid_settings_or_one_clean_error(tmp_path, values):
    """Every numeric flag, random text: parsing either yields settings that validate, or stops
    with a UserError / the parser's one-line exit 2; never anything else."""
    argv = ["--preset", "tiny", "--out", str(tmp_path / "never-created")]
    for name, text in values:
        argv += [f"{flag(name)}={text}"]
    try:
        settings_, resume, resume_from, _processes = parse(argv)
    except UserError as error:
        assert "\n" not in str(error)
        return
    except SystemExit as stop:  # argparse's type conversion: one line, exit 2
        assert stop.code == 2
        return
    assert not resume and resume_from is None
    for name in NUMERIC:
        value = getattr(settings_, name)
        assert value is None or isinstance(value, value_type(FIELDS[name])) or (
            value_type(FIELDS[name]) is float and isinstance(value, int))
    assert not (tmp_path / "never-created").exists()
    time.sleep(0)


def test_trailing_slash_on_data_is_the_same_data_on_resume(tmp_path):
    from train.settings import UsageError, layer

    saved = {"preset": "tiny", "data": str(tmp_path / "corpus"), "seq_len": 32}
    settings_ = layer(saved, {}, {"data": str(tmp_path / "corpus") + "/", "out": "x"})
    assert settings_.seq_len == 32
    with pytest.raises(UsageError, match="differs from the resumed run"):
        layer(saved, {}, {"data": str(tmp_path / "other"), "out": "x"})


def test_a_bad_saved_setting_is_blamed_on_the_checkpoint(existing_run, capsys):
    """A checkpoint whose saved seq_len is out of range: the message names the checkpoint's
    config.json and the saved setting, not a flag the user never passed."""
    for checkpoint in (existing_run / "checkpoints").iterdir():
        config = json.loads((checkpoint / "config.json").read_text())
        config["train"]["seq_len"] = 999
        config.pop("manifest", None)
        (checkpoint / "manifest.json").unlink()
        (checkpoint / "config.json").write_text(json.dumps(config))
    err = expect_error(["--out", str(existing_run), "--resume", "--steps", "6"],
                       "the saved setting seq_len = 999 is invalid", capsys)
    assert "step_000004/config.json" in err, err
