"""The sparsec command: real subprocesses, one-line errors, artifacts that inspect back."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FACTORY = textwrap.dedent('''
    import torch

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
        return model, (torch.randn(2, 32),)

    def broken():
        raise RuntimeError("no weights here")
''')


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sparsec.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.py"
    path.write_text(FACTORY)
    return f"{path}:make"


def _one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("sparsec: error: ")
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr


def test_passes_lists_options_and_docs():
    proc = run("passes")
    assert proc.returncode == 0
    assert "prune-magnitude\n    Zero the smallest |w|" in proc.stdout
    assert "    sparsity     float  default 0.5" in proc.stdout
    assert "named pipelines:" in proc.stdout and "sparse-cpu" in proc.stdout


def test_compile_writes_an_artifact_that_inspect_reads(factory, tmp_path):
    out = tmp_path / "art"
    proc = run("compile", factory, "--pipeline", "prune-magnitude{sparsity=0.75},lower-cpu", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "0" in proc.stdout and "bitmask" in proc.stdout and "75.0%" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"] == "prune-magnitude{sparsity=0.75},lower-cpu"
    assert [x["format"] for x in manifest["layers"]] == ["bitmask", "bitmask"]
    proc = run("inspect", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "2 layers" in proc.stdout and "bitmask" in proc.stdout
    # A tampered weight file is refused with the reason.
    weights = out / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    _one_line_error(run("inspect", str(out)), "does not match its sha256")


def test_compile_dump_graph_and_json(factory, tmp_path):
    proc = run("compile", factory, "-p", "prune-magnitude{sparsity=0.5}", "--dump-graph", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["pipeline"] == "prune-magnitude{sparsity=0.5},lower-cpu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000_captured.py", "001_prune-magnitude.py",
                                                          "002_lower-cpu.py"]


def test_inspect_a_model(factory):
    proc = run("inspect", factory)
    assert proc.returncode == 0, proc.stderr
    assert "captured with symbolic_trace, 2 weighted layers" in proc.stdout


def test_bench(factory):
    proc = run("bench", factory, "-p", "prune-magnitude{sparsity=0.5}", "--repeat", "3")
    assert proc.returncode == 0, proc.stderr
    assert "compiled" in proc.stdout and "eager" in proc.stdout


@pytest.mark.parametrize("args, words", [
    (["compile", "FACTORY", "-p", "prune-magnitde"], ["unknown pass 'prune-magnitde'", "did you mean", "^"]),
    (["compile", "FACTORY", "-p", "prune-magnitude{sparsity=1.5}"], ["sparsity must be in [0, 1)"]),
    (["compile", "nowhere/model.py:make"], ["no such file 'nowhere/model.py'"]),
    (["compile", "no-such-model"], ["no model 'no-such-model'"]),
    (["compile", "FACTORY", "-p", "prune-magnitude{layers=zzz}"], ["matches no layer"]),
    (["compile", "FACTORY", "--target", "cpu", "-p", "lower-cuda"], ["lowers with lower-cuda"]),
    (["inspect", "/"], ["neither an artifact"]),
    (["inspect", ""], ["no model given"]),
    (["compile", "BROKEN"], ["tiny.py:broken raised RuntimeError: no weights here; fix the factory"]),
    (["compile", "FACTORY", "--calibration", "-1"], ["--calibration must be 0 (none) or a number"]),
    (["compile", "FACTORY", "--seq-len", "0"], ["--seq-len must be a positive number"]),
    (["bench", "FACTORY", "--calibration", "-3"], ["--calibration must be 0 (none) or a number"]),
    (["compile", "FACTORY", "-o", "FILE/art"], ["cannot write an artifact at", "is a file, not a directory"]),
    (["compile", "FACTORY", "-o", "FILE"], ["exists and is not a directory"]),
    (["compile", "FACTORY", "--dump-graph", "FILE"], ["--dump-graph", "it is a file"]),
    (["compile", "FACTORY", "-p", "prune-wanda{sparsity=0.5}"], ["needs calibration data", "--calibration N"]),
])
def test_bad_input_is_one_line_and_exit_2(factory, args, words):
    file = factory.rsplit(":", 1)[0]
    swap = {"FACTORY": factory, "BROKEN": f"{file}:broken", "FILE": file}
    args = [swap.get(a, a.replace("FILE/", f"{file}/")) for a in args]
    before = Path(file).read_text()
    _one_line_error(run(*args), *words)
    assert Path(file).read_text() == before  # nothing written beside or under it
    assert [p.name for p in Path(file).parent.iterdir() if p.name != "__pycache__"] == ["tiny.py"]


def _main_error(capsys, *args):
    """Run the command in this process (no interpreter start-up) and return its one error line."""
    from sparsec.cli import main

    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sparsec: error: ") and "Traceback" not in err
    return err


def test_bad_model_folders_and_tokenizers(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("not json{")
    for command in ("compile", "inspect"):
        err = _main_error(capsys, command, str(tmp_path / "model"))
        assert "could not read the config of" in err and "fix or replace" in err
    # `generate` loads --tokenizer before the artifact: a folder without tokenizer files is one line
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text("{}")
    (tmp_path / "tok").mkdir()
    err = _main_error(capsys, "generate", str(tmp_path / "art"), "--prompt", "hi", "--tokenizer", str(tmp_path / "tok"))
    assert "--tokenizer" in err and "no tokenizer could be loaded from this folder" in err


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    err = _main_error(capsys, "tune", "--quick", "-o", str(blocker / "cost.json"))
    assert "cannot write" in err and "is a file" in err
    assert blocker.read_text() == "mine" and sorted(tmp_path.iterdir()) == [blocker]


@pytest.mark.parametrize("spelling", [["--shape", "-4x8"], ["--shape=-4x8"], ["--shape", "0x8"], ["--shape=4x"]])
def test_tune_refuses_a_bad_shape_in_one_line(tmp_path, spelling):
    # argparse alone reads `--shape -4x8` as two options ("expected one argument", after the usage)
    out = tmp_path / "cost.json"
    proc = run("tune", "-o", str(out), *spelling)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    _one_line_error(proc, "--shape must be ROWSxCOLS", "such as --shape 4096x4096",
                    f"got {spelling[-1].removeprefix('--shape=')!r}")
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_bad_arguments_exit_2():
    proc = run("compile")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = run("frobnicate")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
