"""Group word problems: the state-tracking task (Merrill et al. 2024, "The illusion of state in state-space
models"; LT2's state-tracking claim). A sequence of group elements; the answer at each position is the
product of the prefix. S5 (and A5) are non-solvable: constant-depth transformers / linear recurrences with
real diagonal transitions cannot track them at any length; abelian controls Z5, Z60 (or any Z<m>) are easy.

Groups (the `group` parameter): "S<n>" symmetric group on n points, "A<n>" alternating group, "Z<m>"
cyclic group. Elements are numbered:
    S<n>: the permutations of range(n) in itertools.permutations order (element 0 is the identity);
          a permutation p is the tuple (p(0), ..., p(n-1))
    A<n>: the even permutations of range(n), in the same order (element 0 the identity)
    Z<m>: the residues 0 .. m-1
Product: the running state after g_1 .. g_t is s_t = g_t o s_{t-1}, s_0 = identity, i.e. apply g_1 first,
then g_2, ...: as tuples s_t[i] = g_t[s_{t-1}[i]]. For Z<m>, s_t = (g_1 + ... + g_t) mod m.

Vocabulary (vocab_size = 2 + |G|):
    0          pad
    1          BOS
    2 + e      group element number e (inputs and answers share these tokens)

Layout (seq_len = 1 + length):
    tokens  BOS  g_1  g_2  ...  g_n          g_i uniform over the group
    labels  -100 s_1  s_2  ...  s_n
"""
from __future__ import annotations

import itertools
import re
from functools import lru_cache

import numpy as np

from megaloop.tasks.base import IGNORE_INDEX, Task

BOS = 1
ELEM0 = 2
MAX_PERMUTATION_POINTS = 6  # S6 has 720 elements; S7's 5040 squared table would be 200 MB


def _parity(p) -> int:
    seen, swaps = [False] * len(p), 0
    for i in range(len(p)):
        j, cycle = i, 0
        while not seen[j]:
            seen[j], j, cycle = True, p[j], cycle + 1
        swaps += max(cycle - 1, 0)
    return swaps % 2


@lru_cache(maxsize=None)
def group_table(group: str) -> np.ndarray:
    """table[a, b] = the element number of a o b (apply b first, then a), for the group's numbering."""
    m = re.fullmatch(r"([SAZ])(\d+)", group)
    if not m:
        raise ValueError(f"unknown group {group!r}: use S<n>, A<n> or Z<m> (e.g. S5, A5, Z5, Z60)")
    kind, n = m.group(1), int(m.group(2))
    if kind == "Z":
        if n < 2:
            raise ValueError(f"Z<m> needs m >= 2, got {group}")
        r = np.arange(n)
        return (r[:, None] + r[None, :]) % n
    if not 2 <= n <= MAX_PERMUTATION_POINTS or (kind == "A" and n < 3):
        raise ValueError(f"{group}: permutation groups on 2..{MAX_PERMUTATION_POINTS} points (A on 3..) only")
    perms = list(itertools.permutations(range(n)))
    if kind == "A":
        perms = [p for p in perms if _parity(p) == 0]
    number = {p: i for i, p in enumerate(perms)}
    arr = np.array(perms)                                   # [G, n]
    # (a o b)[i] = a[b[i]]
    composed = arr[:, arr]                                  # composed[a, b, i] = arr[a, arr[b, i]]
    return np.array([[number[tuple(composed[a, b])] for b in range(len(perms))] for a in range(len(perms))])


class StateTrackingTask(Task):
    name = "state_tracking"

    def __init__(self, group: str = "S5", length: int = 32, seed: int = 0):
        super().__init__(seed)
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.group, self.length = str(group).upper(), int(length)
        self.table = group_table(self.group)
        self.order = self.table.shape[0]
        self.vocab_size = ELEM0 + self.order
        self.seq_len = 1 + self.length

    def params(self) -> dict:
        return {"group": self.group, "length": self.length}

    def _generate(self, rng):
        g = rng.integers(0, self.order, size=self.length)
        states = np.empty(self.length, dtype=np.int64)
        s = 0  # identity
        for t, e in enumerate(g):
            s = self.table[e, s]
            states[t] = s
        return np.concatenate([[BOS], ELEM0 + g]), np.concatenate([[IGNORE_INDEX], ELEM0 + states])
