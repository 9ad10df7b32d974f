"""``sparsec finetune``: prune, fine-tune, write the result; bad input is one line and writes nothing."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from sparsec.cli import main

FACTORY = textwrap.dedent('''
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.fc1 = nn.Linear(d, 2 * d)
            self.fc2 = nn.Linear(2 * d, d)
            self.norm = nn.LayerNorm(d)

        def forward(self, x):
            return self.norm(x + self.fc2(torch.relu(self.fc1(x))))

    class Net(nn.Module):
        def __init__(self, d=16, vocab=40):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
            self.head = nn.Linear(d, vocab)

        def forward(self, input_ids):
            h = self.emb(input_ids)
            for b in self.blocks:
                h = b(h)
            return self.head(h)

    def make():
        torch.manual_seed(0)
        return Net().eval(), torch.randint(0, 40, (2, 8))
''')


@pytest.fixture
def files(tmp_path):
    (tmp_path / "net.py").write_text(FACTORY)
    g = torch.Generator().manual_seed(3)
    torch.save({"input_ids": torch.randint(0, 40, (12, 8), generator=g)}, tmp_path / "data.pt")
    return tmp_path


def run(files, *extra: str) -> int:
    return main(["finetune", f"{files / 'net.py'}:make", "--data", str(files / "data.pt"), "--quiet", *extra])


def test_cli_prunes_finetunes_and_writes(files, capsys):
    out = files / "out"
    code = run(files, "--prune", "prune-magnitude{sparsity=0.5}", "--steps", "3", "--kl", "1", "--lr", "0.01",
               "--checkpoint-dir", str(files / "ckpt"), "-o", str(out))
    assert code == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    weights = load_file(str(out / "model.safetensors"))
    masks = load_file(str(out / "masks.safetensors"))
    assert set(masks) == {"blocks.0.fc1.weight", "blocks.0.fc2.weight", "blocks.1.fc1.weight",
                          "blocks.1.fc2.weight", "head.weight"}
    for name, mask in masks.items():
        assert mask.dtype == torch.uint8
        assert float((mask == 0).float().mean()) == pytest.approx(0.5)
        assert torch.equal(weights[name][mask == 0], torch.zeros(int((mask == 0).sum())))
    report = json.loads((out / "finetune.json").read_text())
    assert len(report["history"]) == 3 and report["mask_violations"] == 0
    assert set(report["history"][0]) >= {"ce", "kl", "squarehead", "loss", "lr"}
    assert (files / "ckpt" / "last.pt").exists()
    # the output directory is never overwritten: refused before anything is loaded
    before = sorted(p.name for p in out.iterdir())
    assert run(files, "--steps", "3", "-o", str(out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("args, message", [
    (["--gradual", "abc"], "bad --gradual"),
    (["--gradual", "1.5"], "final_sparsity"),
    (["--steps", "0"], "steps must be a positive integer"),
    (["--prune", "prune-magnitude{sparsity=2}"], "sparsity"),
    (["--kl", "0", "--squarehead", "0", "--ce", "0"], "all loss weights are 0"),
    (["--blocks", "layers.*"], "matches no module"),
    (["--samples", "-1"], "--samples must be at least 0, got -1"),
    (["--calibration", "-2"], "--calibration must be at least 0, got -2"),
    (["--eval-windows", "-1"], "--eval-windows must be at least 0, got -1"),
    (["--seq-len", "0"], "--seq-len must be at least 1, got 0"),
    (["--ce", "inf"], "loss weight ce must be a finite number >= 0, got inf"),
    (["--kl", "1", "--temperature", "inf"], "temperature must be a finite positive number, got inf"),
    (["--weight-decay", "inf"], "weight_decay must be a finite number >= 0"),
])
def test_cli_bad_input_is_one_line(files, capsys, args, message):
    assert run(files, "--steps", "2", "-o", str(files / "never"), *args) == 2
    first = capsys.readouterr().err.strip().splitlines()[0]  # pipeline errors add the text and a caret
    assert first.startswith("sparsec: error:") and message in first
    assert not (files / "never").exists()


def test_cli_empty_data_file(files, capsys):
    torch.save({"input_ids": torch.zeros(0, 8, dtype=torch.long)}, files / "empty.pt")
    code = main(["finetune", f"{files / 'net.py'}:make", "--data", str(files / "empty.pt"), "--quiet",
                 "-o", str(files / "never")])
    assert code == 2 and "empty" in capsys.readouterr().err
    assert not (files / "never").exists()


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "", "--data {} is empty; give a .pt (torch.save) or .safetensors file holding input_ids"),
    ("notes.txt", "plain text, not token ids\n", "cannot read --data {} (")
])
def test_cli_unreadable_data_files_say_what_to_give(files, capsys, name, content, message):
    (files / name).write_text(content)
    code = main(["finetune", f"{files / 'net.py'}:make", "--data", str(files / name), "--quiet", "--steps", "2",
                 "-o", str(files / "never")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message.format(files / name) in err
    assert "or --data wikipedia" in err
    assert (files / name).read_text() == content and not (files / "never").exists()


def test_cli_unwritable_output_is_refused_before_training(files, capsys):
    blocker = files / "a-file"
    blocker.write_text("mine")
    assert run(files, "--steps", "2", "-o", str(blocker / "out")) == 2
    err = capsys.readouterr().err
    assert "cannot write output" in err and "is a file, not a directory" in err
    assert blocker.read_text() == "mine"


def test_example_tiny_run_recovers_perplexity(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "finetune_squarehead.py"
    spec = importlib.util.spec_from_file_location("finetune_squarehead", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--tiny", "--steps", "20"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    before, after = (float(x) for x in line.split("one-shot ")[1].split(" after")[0].split(" -> fine-tuned "))
    assert after < before and line.endswith("still zero: True")
