"""MQAR: multi-query associative recall (Zoology, Arora et al. 2023; the LT2 paper's recall task).

Vocabulary (vocab_size = 3 + num_keys + num_values):
    0                       pad
    1                       BOS
    2                       SEP (end of the key-value pairs)
    3 + k                   key k,   k in [0, num_keys)
    3 + num_keys + v        value v, v in [0, num_values)

Layout (seq_len = 2 + 2 * num_kv_pairs + 2 * num_queries):
    tokens  BOS  k_1 v_1 ... k_N v_N  SEP  q_1 a_1  q_2 a_2 ... q_Q a_Q
    labels  -100 (all -100)           -100 a_1 -100 a_2 -100 ... a_Q -100

The N keys of an example are distinct; values are drawn independently (they may repeat). The Q queries
are distinct keys of the example in random order, and a_j is the value paired with q_j. The answer is the
label at the query's position (the model predicts the value right after reading the key); a_j also follows
q_j in the tokens (teacher forcing, as in Zoology), so later queries never depend on earlier answers.
"""
from __future__ import annotations

import numpy as np

from megaloop.tasks.base import IGNORE_INDEX, Task

BOS, SEP, KEY0 = 1, 2, 3


class MQARTask(Task):
    name = "mqar"
    answers_in_tokens = True  # a_j follows q_j

    def __init__(self, num_kv_pairs: int = 8, num_queries: int = None, num_keys: int = 64,
                 num_values: int = 64, seed: int = 0):
        super().__init__(seed)
        num_queries = num_kv_pairs if num_queries is None else num_queries
        if num_kv_pairs < 1:
            raise ValueError(f"num_kv_pairs must be >= 1, got {num_kv_pairs}")
        if not 1 <= num_queries <= num_kv_pairs:
            raise ValueError(f"num_queries must be in [1, num_kv_pairs={num_kv_pairs}], got {num_queries}")
        if num_keys < num_kv_pairs:
            raise ValueError(f"num_keys ({num_keys}) must be >= num_kv_pairs ({num_kv_pairs}): keys are distinct")
        if num_values < 1:
            raise ValueError(f"num_values must be >= 1, got {num_values}")
        self.num_kv_pairs, self.num_queries = int(num_kv_pairs), int(num_queries)
        self.num_keys, self.num_values = int(num_keys), int(num_values)
        self.value0 = KEY0 + self.num_keys
        self.vocab_size = self.value0 + self.num_values
        self.seq_len = 2 + 2 * self.num_kv_pairs + 2 * self.num_queries

    def params(self) -> dict:
        return {"num_kv_pairs": self.num_kv_pairs, "num_queries": self.num_queries,
                "num_keys": self.num_keys, "num_values": self.num_values}

    def _generate(self, rng):
        n, q = self.num_kv_pairs, self.num_queries
        keys = rng.choice(self.num_keys, size=n, replace=False)
        values = rng.integers(0, self.num_values, size=n)
        asked = rng.permutation(n)[:q]
        tokens = np.empty(self.seq_len, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        tokens[0] = BOS
        tokens[1:1 + 2 * n:2] = KEY0 + keys
        tokens[2:2 + 2 * n:2] = self.value0 + values
        tokens[1 + 2 * n] = SEP
        start = 2 + 2 * n
        tokens[start::2] = KEY0 + keys[asked]
        tokens[start + 1::2] = self.value0 + values[asked]
        labels[start::2] = self.value0 + values[asked]
        return tokens, labels
