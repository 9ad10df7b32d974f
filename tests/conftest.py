"""Shared test set-up.

numba reads NUMBA_ENABLE_CUDASIM when it is first imported, so the switch to the CUDA simulator
on machines without a GPU has to happen here, before any test module imports numba.
"""

from __future__ import annotations

import os
import shutil

if "NUMBA_ENABLE_CUDASIM" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def tiny_llama():
    """A 2-layer random-weight Llama (the SmolLM2 architecture at toy size) and its inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}


@pytest.fixture
def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    model = BertModel(config).eval()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (2, 10), generator=gen)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 96),
                                torch.nn.ReLU(), torch.nn.Linear(96, 24)).eval()
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(3))
    return model, x
