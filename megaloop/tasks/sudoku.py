"""Sudoku with a unique solution (the fixed-point paper's task), 4x4 (2x2 boxes) and 9x9 (3x3 boxes).

Generation (a pure function of the example's rng):
  1. a full grid: the valid base pattern digit(r, c) = (box * (r % box) + r // box + c) % size, with its
     bands, the rows inside each band, its stacks, the columns inside each stack and the digit labels
     shuffled (each such shuffle keeps a grid valid);
  2. clues removed one cell at a time in a random order: a removal is kept only while a backtracking solver
     (bitmasks, fewest-candidates cell first) still finds exactly one solution, so the puzzle always has
     exactly one. Removal stops at `num_clues` givens (None: when no further cell can go, a minimal puzzle).

Vocabulary (vocab_size = 4 + size):
    0          pad
    1          BOS
    2          SEP
    3          blank cell
    3 + d      digit d, d in [1, size]

Layout (seq_len = 2 + 2 * size^2; cells in row-major order):
    tokens  BOS  puzzle cells (blank or digit)  SEP  puzzle cells again
    labels  -100 (all -100)                     -100 the solution's digits
The second copy of the puzzle is where the model writes the full solution (givens included): every answer
position can attend to the whole puzzle, and no answer is fed back in (no teacher forcing), so an example
is right only if the model solves the grid.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np

from megaloop.tasks.base import IGNORE_INDEX, Task

BOS, SEP, BLANK = 1, 2, 3
DIGIT0 = 3  # digit d (1-based) is token 3 + d
BOX = {4: 2, 9: 3}


def _units(size: int):
    box = BOX[size]
    peers = []
    for cell in range(size * size):
        r, c = divmod(cell, size)
        br, bc = r // box * box, c // box * box
        ps = {r * size + j for j in range(size)} | {i * size + c for i in range(size)}
        ps |= {(br + i) * size + bc + j for i in range(box) for j in range(box)}
        ps.discard(cell)
        peers.append(sorted(ps))
    return peers


_PEERS = {size: _units(size) for size in BOX}


def count_solutions(grid: List[int], size: int, limit: int = 2) -> int:
    """Solutions of grid (row-major, 0 = blank), counted up to `limit`."""
    peers, full = _PEERS[size], (1 << size) - 1
    grid = list(grid)
    cand = []
    for cell, v in enumerate(grid):
        if v:
            cand.append(0)
            continue
        used = 0
        for p in peers[cell]:
            if grid[p]:
                used |= 1 << (grid[p] - 1)
        cand.append(full & ~used)
    for cell, v in enumerate(grid):  # givens that clash: no solution
        if v and any(grid[p] == v for p in peers[cell]):
            return 0

    def solve() -> int:
        best, best_n = -1, size + 1
        for cell in range(size * size):
            if not grid[cell]:
                n = bin(cand[cell]).count("1")
                if n < best_n:
                    best, best_n = cell, n
                    if n <= 1:
                        break
        if best < 0:
            return 1
        if best_n == 0:
            return 0
        found, bits = 0, cand[best]
        while bits and found < limit:
            bit = bits & -bits
            bits ^= bit
            grid[best] = bit.bit_length()
            changed = [p for p in peers[best] if not grid[p] and cand[p] & bit]
            for p in changed:
                cand[p] ^= bit
            found += solve()
            for p in changed:
                cand[p] |= bit
            grid[best] = 0
        return found

    return solve()


def full_grid(rng: np.random.Generator, size: int) -> np.ndarray:
    box = BOX[size]
    rows = [b * box + r for b in rng.permutation(box) for r in rng.permutation(box)]
    cols = [b * box + c for b in rng.permutation(box) for c in rng.permutation(box)]
    digits = rng.permutation(size) + 1
    return np.array([[digits[(box * (r % box) + r // box + c) % size] for c in cols] for r in rows])


def make_puzzle(rng: np.random.Generator, size: int, num_clues: Optional[int] = None):
    """(puzzle, solution): row-major int arrays, 0 = blank in the puzzle; the puzzle has one solution."""
    solution = full_grid(rng, size).reshape(-1)
    puzzle = [int(v) for v in solution]
    clues = size * size
    for cell in rng.permutation(size * size):
        if num_clues is not None and clues <= num_clues:
            break
        keep, puzzle[cell] = puzzle[cell], 0
        if count_solutions(puzzle, size, limit=2) == 1:
            clues -= 1
        else:
            puzzle[cell] = keep
    return np.array(puzzle), solution


class SudokuTask(Task):
    name = "sudoku"

    def __init__(self, size: int = 4, num_clues: Optional[int] = None, seed: int = 0):
        super().__init__(seed)
        if size not in BOX:
            raise ValueError(f"sudoku size must be 4 or 9, got {size}")
        if num_clues is not None and not 0 <= num_clues <= size * size:
            raise ValueError(f"num_clues must be in [0, {size * size}], got {num_clues}")
        self.size, self.num_clues = int(size), num_clues
        self.vocab_size = DIGIT0 + 1 + self.size
        self.seq_len = 2 + 2 * self.size * self.size

    def params(self) -> dict:
        return {"size": self.size, "num_clues": self.num_clues}

    def _generate(self, rng):
        puzzle, solution = make_puzzle(rng, self.size, self.num_clues)
        cells = np.where(puzzle > 0, DIGIT0 + puzzle, BLANK)
        tokens = np.concatenate([[BOS], cells, [SEP], cells])
        n = self.size * self.size
        labels = np.concatenate([np.full(n + 2, IGNORE_INDEX), DIGIT0 + solution])
        return tokens, labels
