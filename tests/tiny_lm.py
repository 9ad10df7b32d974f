"""A tiny language model for the fine-tuning tests: an embedding, a ModuleList of residual MLP
blocks (the layout the tap pass finds on its own) and a linear head over ``VOCAB`` tokens.

Shared by the single-process and the distributed trainer tests; spawned ranks import it the
same way (the tests folder is on their ``sys.path``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

VOCAB = 40


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


class Net(nn.Module):
    def __init__(self, d: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(layers)])
        self.head = nn.Linear(d, VOCAB)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)
