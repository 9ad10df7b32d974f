"""Pipeline text: exact round trip, named pipelines, and errors that point at the bad column."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from sparsec.passes import Pass, PassResult, Pipeline, PipelineSyntaxError, register_pass
from sparsec.passes.base import PassOptionError, make_pass, unregister_pass
from sparsec.passes.pipeline import register_pipeline, registered_pipelines


@pytest.mark.parametrize("text", [
    "prune-magnitude{sparsity=0.75},lower-cpu",
    "prune-magnitude{sparsity=0.75,scope=global},lower-cpu{value_type=bf16}",
    'prune-magnitude{sparsity=0.5,layers="q_proj,k_proj",ignore=lm_head},lower-cpu',
    "prune-nm{n=2,m=4},lower-cpu{format=nm,group=64}",
    "lower-cpu",
])
def test_round_trip_is_exact(text):
    pipe = Pipeline.parse(text)
    assert pipe.to_text() == text
    assert Pipeline.parse(pipe.to_text()) == pipe


def test_whitespace_is_ignored_and_printing_is_canonical():
    pipe = Pipeline.parse(" prune-magnitude { sparsity = 0.75 } , lower-cpu ")
    assert pipe.to_text() == "prune-magnitude{sparsity=0.75},lower-cpu"


def test_full_printing_lists_every_option_and_parses_back():
    pipe = Pipeline.parse("prune-magnitude{sparsity=0.25}")
    full = pipe.to_text(full=True)
    assert full.startswith("prune-magnitude{sparsity=0.25,scope=layer,")
    assert Pipeline.parse(full) == pipe


def test_typed_options():
    (p,) = Pipeline.parse("prune-magnitude{sparsity=0.3,scope=global}").passes
    assert isinstance(p.sparsity, float) and p.sparsity == 0.3 and p.scope == "global"


def test_named_pipeline_expands():
    assert registered_pipelines()["sparse-cpu"] == "prune-magnitude{sparsity=0.5},lower-cpu"
    assert Pipeline.parse("sparse-cpu").to_text() == "prune-magnitude{sparsity=0.5},lower-cpu"
    assert Pipeline.parse("sparse-cpu,dense-cpu").to_text() == "prune-magnitude{sparsity=0.5},lower-cpu,lower-cpu"


def test_named_pipeline_names_are_unique():
    with pytest.raises(ValueError, match="already registered"):
        register_pipeline("sparse-cpu")(lambda: "lower-cpu")


@pytest.mark.parametrize("text, column, words", [
    ("prune-magnitde{sparsity=0.5}", 1, ["unknown pass 'prune-magnitde'", "did you mean 'prune-magnitude'"]),
    ("prune-magnitude{sparsity 0.5}", 26, ["expected '='"]),
    ("prune-magnitude{sparsty=0.5}", 17, ["no option 'sparsty'", "'sparsity'"]),
    ("prune-magnitude{sparsity=abc}", 26, ["expects float", "'abc'"]),
    ("prune-magnitude{sparsity=0.5", 29, ["expected '}'"]),
    ("prune-magnitude,,lower-cpu", 17, ["expected a pass name"]),
    ("prune-magnitude{sparsity=0.5,sparsity=0.6}", 30, ["given twice"]),
    ('prune-magnitude{layers="q_proj}', 24, ["unterminated"]),
    ("lower-cpu lower-cpu", 11, ["separate passes with ','"]),
    ("", 1, ["empty pipeline"]),
])
def test_syntax_errors_point_at_the_column(text, column, words):
    with pytest.raises(PipelineSyntaxError) as info:
        Pipeline.parse(text)
    err = info.value
    assert err.position + 1 == column, str(err)
    assert str(err).startswith(f"bad pipeline at column {column}:")
    assert "\n" not in str(err)
    for w in words:
        assert w in str(err)
    caret_line = err.pretty().splitlines()[-1]
    assert caret_line.index("^") == 2 + err.position


def test_impossible_values_are_rejected_at_parse_time():
    with pytest.raises(PipelineSyntaxError, match=r"sparsity must be in \[0, 1\)"):
        Pipeline.parse("prune-magnitude{sparsity=1.0}")
    with pytest.raises(PassOptionError, match="no option 'sparsty'"):
        make_pass("prune-magnitude", sparsty=0.5)


def test_registry_rejects_duplicates_and_bad_names():
    @dataclass
    class Again(Pass):
        """Duplicate of an existing name."""
        name: ClassVar[str] = "prune-magnitude"

    with pytest.raises(ValueError, match="already registered"):
        register_pass(Again)

    @dataclass
    class BadName(Pass):
        """Snake case is not allowed."""
        name: ClassVar[str] = "bad_name"

    with pytest.raises(ValueError, match="kebab-case"):
        register_pass(BadName)

    class NotDataclass(Pass):
        """Options must be typed fields."""
        name: ClassVar[str] = "not-a-dataclass"

    with pytest.raises(TypeError, match="@dataclass"):
        register_pass(NotDataclass)


def test_registering_a_new_pass_makes_it_parseable():
    @dataclass
    class Noop(Pass):
        """Does nothing, on purpose."""
        name: ClassVar[str] = "test-noop"
        times: int = 1
        label: str = "x"

        def run(self, gm, ctx):
            return PassResult(gm, False)

    register_pass(Noop)
    try:
        pipe = Pipeline.parse('test-noop{times=3,label="a b,c"}')
        assert pipe.passes[0].times == 3 and pipe.passes[0].label == "a b,c"
        assert pipe.to_text() == 'test-noop{times=3,label="a b,c"}'
    finally:
        unregister_pass("test-noop")
