"""megaloop.tasks: each generator's answers against an independent computation written here, sudoku
uniqueness with an independent solver (exact cover), determinism per seed, disjoint and covering DP shards,
exact resume, labels -100 outside the answers, and exact_match on a hand-made case."""
import itertools

import numpy as np
import pytest
import torch

from megaloop.data.sampler import collate_samples
from megaloop.tasks import (IGNORE_INDEX, TaskDataset, build_task, build_task_loader, exact_match,
                            exact_match_counts, task_inputs_and_labels)

CASES = [
    ("parity", dict(length=12)),
    ("prefix_sum", dict(length=10, modulus=7)),
    ("mqar", dict(num_kv_pairs=6, num_queries=4, num_keys=16, num_values=8)),
    ("s5", dict(length=10)),
    ("a5", dict(length=10)),
    ("z60", dict(length=10)),
    ("sudoku", dict(size=4)),
    ("sudoku", dict(size=9, num_clues=40)),
]


def _all_examples(task, n):
    return [tuple(t.tolist() for t in task.example(i)) for i in range(n)]


# ---- independent answers -------------------------------------------------------------------------------

@pytest.mark.parametrize("length,modulus", [(12, 2), (40, 2), (10, 7)])
def test_prefix_sum_answers(length, modulus):
    task = build_task("prefix_sum", length=length, modulus=modulus, seed=3)
    assert task.seq_len == length + 1 and task.vocab_size == modulus + 2
    for i in range(20):
        tokens, labels = task.example(i)
        assert tokens[0] == 1 and labels[0] == IGNORE_INDEX
        digits = [int(t) - 2 for t in tokens[1:]]
        assert all(0 <= d < modulus for d in digits)
        running = 0
        for t, d in enumerate(digits, start=1):
            running = (running + d) % modulus
            assert labels[t] == running + 2


def test_parity_is_xor_and_length_extrapolates():
    short, long = build_task("parity", length=8, seed=1), build_task("parity", length=64, seed=1)
    assert (short.seq_len, long.seq_len) == (9, 65)
    for task in (short, long):
        tokens, labels = task.example(5)
        bits = (tokens[1:] - 2).tolist()
        for t in range(1, len(bits) + 1):
            x = 0
            for b in bits[:t]:
                x ^= b
            assert labels[t] - 2 == x


def test_mqar_answers():
    task = build_task("mqar", num_kv_pairs=6, num_queries=4, num_keys=16, num_values=8, seed=2)
    assert task.seq_len == 2 + 12 + 8 and task.vocab_size == 3 + 16 + 8
    for i in range(30):
        tokens, labels = (x.tolist() for x in task.example(i))
        sep = tokens.index(2)
        assert tokens[0] == 1 and sep == 13
        pairs = tokens[1:sep]
        keys, values = pairs[0::2], pairs[1::2]
        assert all(3 <= k < 19 for k in keys) and all(19 <= v < 27 for v in values)
        assert len(set(keys)) == len(keys)
        lookup = dict(zip(keys, values))
        queries = tokens[sep + 1::2]
        assert len(set(queries)) == 4
        answered = [p for p, y in enumerate(labels) if y != IGNORE_INDEX]
        assert answered == list(range(sep + 1, len(tokens), 2))
        for p in answered:
            assert labels[p] == lookup[tokens[p]] and tokens[p + 1] == labels[p]


def _compose_left_to_right(perms):
    """State after applying perms[0], then perms[1], ...: position i holds where i went."""
    state = list(range(len(perms[0])))
    for g in perms:
        state = [g[s] for s in state]
    return tuple(state)


@pytest.mark.parametrize("group,n,even", [("S5", 5, False), ("A5", 5, True), ("S3", 3, False)])
def test_permutation_answers(group, n, even):
    elements = [p for p in itertools.permutations(range(n))
                if not even or sum(p[i] > p[j] for i in range(n) for j in range(i + 1, n)) % 2 == 0]
    assert len(elements) == {"S5": 120, "A5": 60, "S3": 6}[group]
    task = build_task("state_tracking", group=group, length=10, seed=4)
    assert task.vocab_size == 2 + len(elements)
    for i in range(20):
        tokens, labels = task.example(i)
        gs = [elements[t - 2] for t in tokens[1:].tolist()]
        for t in range(1, len(gs) + 1):
            assert elements[int(labels[t]) - 2] == _compose_left_to_right(gs[:t])


@pytest.mark.parametrize("name,m", [("z5", 5), ("z60", 60)])
def test_cyclic_answers(name, m):
    task = build_task(name, length=15, seed=9)
    assert task.vocab_size == 2 + m
    for i in range(20):
        tokens, labels = task.example(i)
        xs = (tokens[1:] - 2).tolist()
        assert [int(y) - 2 for y in labels[1:]] == [sum(xs[:t]) % m for t in range(1, len(xs) + 1)]


def test_s5_is_not_abelian():
    # the task's products follow the order of the inputs: swapping two inputs changes some answer
    task = build_task("s5", length=2, seed=0)
    found = False
    for i in range(20):
        tokens, labels = task.example(i)
        elements = list(itertools.permutations(range(5)))
        a, b = elements[tokens[1] - 2], elements[tokens[2] - 2]
        found |= _compose_left_to_right([a, b]) != _compose_left_to_right([b, a])
    assert found


# ---- sudoku --------------------------------------------------------------------------------------------

def _exact_cover_solutions(grid, size, limit=3):
    """Count sudoku solutions (up to limit) with Knuth's Algorithm X over dict-of-sets constraints."""
    box = int(round(size ** 0.5))
    X = {}
    Y = {}
    for r, c, d in itertools.product(range(size), range(size), range(1, size + 1)):
        b = (r // box) * box + c // box
        Y[(r, c, d)] = [("rc", r, c), ("rd", r, d), ("cd", c, d), ("bd", b, d)]
    for row, cols in Y.items():
        for col in cols:
            X.setdefault(col, set()).add(row)

    def select(row):
        removed = []
        for j in Y[row]:
            for i in X[j]:
                for k in Y[i]:
                    if k != j:
                        X[k].remove(i)
            removed.append(X.pop(j))
        return removed

    def deselect(row, removed):
        for j in reversed(Y[row]):
            X[j] = removed.pop()
            for i in X[j]:
                for k in Y[i]:
                    if k != j:
                        X[k].add(i)

    for idx, v in enumerate(grid):
        if v:
            row = (idx // size, idx % size, v)
            if any(row not in X[j] for j in Y[row]):
                return 0
            select(row)

    def search():
        if not X:
            return 1
        col = min(X, key=lambda j: len(X[j]))
        total = 0
        for row in list(X[col]):
            removed = select(row)
            total += search()
            deselect(row, removed)
            if total >= limit:
                break
        return total

    return search()


def _valid_solution(sol, size):
    box = int(round(size ** 0.5))
    g = np.array(sol).reshape(size, size)
    want = set(range(1, size + 1))
    return (all(set(g[r]) == want for r in range(size)) and all(set(g[:, c]) == want for c in range(size))
            and all(set(g[r:r + box, c:c + box].reshape(-1)) == want
                    for r in range(0, size, box) for c in range(0, size, box)))


@pytest.mark.parametrize("size,num_clues,count", [(4, None, 12), (9, None, 3), (9, 30, 2)])
def test_sudoku_unique_and_consistent(size, num_clues, count):
    task = build_task("sudoku", size=size, num_clues=num_clues, seed=11)
    n = size * size
    assert task.seq_len == 2 + 2 * n and task.vocab_size == 4 + size
    for i in range(count):
        tokens, labels = (x.tolist() for x in task.example(i))
        assert tokens[0] == 1 and tokens[n + 1] == 2 and tokens[1:n + 1] == tokens[n + 2:]
        puzzle = [0 if t == 3 else t - 3 for t in tokens[1:n + 1]]
        assert labels[:n + 2] == [IGNORE_INDEX] * (n + 2)
        solution = [y - 3 for y in labels[n + 2:]]
        assert _valid_solution(solution, size)
        assert all(p in (0, s) for p, s in zip(puzzle, solution))       # the givens agree with it
        assert _exact_cover_solutions(puzzle, size) == 1                 # and it is the only one
        clues = sum(1 for p in puzzle if p)
        if num_clues is not None:
            assert clues == num_clues
        else:  # minimal: blanking any further given makes the solution ambiguous
            assert clues < n
            for cell in [k for k, p in enumerate(puzzle) if p][:4]:
                fewer = list(puzzle)
                fewer[cell] = 0
                assert _exact_cover_solutions(fewer, size) > 1


# ---- determinism, sharding, resume, labels -------------------------------------------------------------

@pytest.mark.parametrize("name,params", CASES)
def test_deterministic_per_seed(name, params):
    a = _all_examples(build_task(name, seed=5, **params), 4)
    assert a == _all_examples(build_task(name, seed=5, **params), 4)
    assert a != _all_examples(build_task(name, seed=6, **params), 4)
    assert len({str(x) for x in a}) > 1                                   # indices differ too


@pytest.mark.parametrize("name,params", CASES)
def test_labels_outside_answers_and_vocab(name, params):
    task = build_task(name, seed=1, **params)
    for i in range(3):
        tokens, labels = task.example(i)
        assert tokens.dtype == labels.dtype == torch.long and tokens.shape == labels.shape == (task.seq_len,)
        assert int(tokens.min()) >= 1 and int(tokens.max()) < task.vocab_size     # 0 = pad, never emitted
        answer = labels != IGNORE_INDEX
        assert answer.any() and not answer[0]
        assert int(labels[answer].min()) >= 1 and int(labels[answer].max()) < task.vocab_size


def test_dp_shards_disjoint_covering_and_resume():
    task = build_task("mqar", num_kv_pairs=4, seed=0)
    dataset = TaskDataset(task, num_samples=48)
    mbs, dp = 3, 4

    def stream(rank, consumed=0):
        return [task_inputs_and_labels(b) for b in build_task_loader(dataset, consumed, mbs, rank, dp)]

    shards = [stream(r) for r in range(dp)]
    rows = [tuple(x.tolist()) for s in shards for tok, _ in s for x in tok]
    expected = [tuple(task.example(i)[0].tolist()) for i in range(48)]
    assert sorted(rows) == sorted(expected) and len(set(rows)) == len(rows)   # disjoint and covering
    # the sampler's convention: rank r's k-th batch is indices (k * dp + r) * mbs + [0, mbs)
    for r in range(dp):
        for k, (tok, lab) in enumerate(shards[r]):
            for b in range(mbs):
                i = (k * dp + r) * mbs + b
                ref_t, ref_l = task.example(i)
                assert torch.equal(tok[b], ref_t) and torch.equal(lab[b], ref_l)
    # resume after 2 global micro-batches: the same stream, from there
    consumed = 2 * mbs * dp
    for r in range(dp):
        resumed = stream(r, consumed)
        assert len(resumed) == len(shards[r]) - 2
        for (t1, l1), (t2, l2) in zip(resumed, shards[r][2:]):
            assert torch.equal(t1, t2) and torch.equal(l1, l2)
    # a reader process changes nothing
    workers = [task_inputs_and_labels(b) for b in build_task_loader(dataset, consumed, mbs, 1, dp, num_workers=1)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(workers, shards[1][2:]))
    assert len(workers) == len(shards[1]) - 2


def test_dataset_offset_and_collate():
    task = build_task("parity", length=6, seed=2)
    ds = TaskDataset(task, num_samples=5, offset=10)
    assert len(ds) == 5 and ds[0].shape == (2, 7)
    batch = collate_samples([ds[i] for i in range(3)])
    tokens, labels = task_inputs_and_labels(batch)
    assert torch.equal(tokens[1], task.example(11)[0]) and torch.equal(labels[2], task.example(12)[1])
    with pytest.raises(IndexError):
        ds[5]


def test_exact_match_hand_made():
    I = IGNORE_INDEX
    labels = torch.tensor([[I, 5, 6, I],     # both answers right
                           [I, 5, 6, 7],     # one of three wrong
                           [I, I, I, I]])    # no answer: not counted
    preds = torch.tensor([[9, 5, 6, 0],
                          [1, 5, 0, 7],
                          [1, 1, 1, 1]])
    assert exact_match_counts(preds, labels) == (1, 2, 4, 5)
    assert exact_match(preds, labels) == (0.5, 0.8)
    logits = torch.nn.functional.one_hot(preds, num_classes=10).float()
    assert exact_match(logits, labels) == (0.5, 0.8)
    assert exact_match(preds[0], labels[0]) == (1.0, 1.0)


def test_build_task_errors():
    with pytest.raises(ValueError, match="unknown task"):
        build_task("nope")
    with pytest.raises(ValueError, match="no parameter"):
        build_task("parity", lenght=3)
    with pytest.raises(ValueError, match="fixes"):
        build_task("parity", modulus=3)
    with pytest.raises(ValueError, match="unknown group"):
        build_task("state_tracking", group="Q8")
    with pytest.raises(ValueError, match="4 or 9"):
        build_task("sudoku", size=6)
