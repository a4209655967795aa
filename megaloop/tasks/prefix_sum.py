"""Prefix parity / prefix sums mod m (the fixed-point paper's running-state task), with length as a
parameter for length extrapolation (train on `length` n, evaluate a task built with a longer length).

Vocabulary (vocab_size = 2 + modulus):
    0          pad
    1          BOS
    2 + d      the digit d, d in [0, modulus)  (inputs and answers share these tokens)

Layout (seq_len = 1 + length):
    tokens  BOS  x_1  x_2  ...  x_n          x_i uniform in [0, modulus)
    labels  -100 s_1  s_2  ...  s_n          s_t = (x_1 + ... + x_t) mod modulus, as the token 2 + s_t

modulus = 2 is prefix parity (build_task("parity", length=n)). The answer at position t depends on the
tokens up to t only, so a causal model can produce every answer in one forward pass.
"""
from __future__ import annotations

import numpy as np

from megaloop.tasks.base import IGNORE_INDEX, Task

BOS = 1
DIGIT0 = 2


class PrefixSumTask(Task):
    name = "prefix_sum"

    def __init__(self, length: int = 32, modulus: int = 2, seed: int = 0):
        super().__init__(seed)
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if modulus < 2:
            raise ValueError(f"modulus must be >= 2, got {modulus}")
        self.length, self.modulus = int(length), int(modulus)
        self.vocab_size = DIGIT0 + self.modulus
        self.seq_len = 1 + self.length

    def params(self) -> dict:
        return {"length": self.length, "modulus": self.modulus}

    def _generate(self, rng):
        x = rng.integers(0, self.modulus, size=self.length)
        tokens = np.concatenate([[BOS], DIGIT0 + x])
        labels = np.concatenate([[IGNORE_INDEX], DIGIT0 + np.cumsum(x) % self.modulus])
        return tokens, labels
