"""The exported modeling file's copies of megaloop code stay copies.

megaloop/export/hf_template/modeling_megaloop.py must stay self-contained (an exported folder imports
neither megaloop nor DeepSpeed), so the pieces it shares with megaloop are copied. Each copy carries a
marker on the line above its `def` / `class`:

    # Copied from megaloop/<path>.py:<function, Class or Class.method>
    # Copied from megaloop/<path>.py:<name> with old_name->new_name, other->renamed

and must equal the named source up to docstrings, comments, formatting and the declared renames
(compared as ASTs). A change to the source fails here until the copy is updated.
"""
import ast
import copy
import difflib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_DIR = ROOT / "megaloop" / "export" / "hf_template"
MARKER = re.compile(r"^(?P<indent>[ \t]*)# Copied from (?P<path>megaloop/[\w/]+\.py):(?P<name>[\w.]+)"
                    r"(?: with (?P<renames>.+))?\s*$")
# Copies the HF modeling file must keep marked (a marker dropped by accident fails here).
EXPECTED = {
    "megaloop/model/layers.py": {"rms_norm", "RMSNorm.__init__", "rope_for_positions", "apply_rope",
                                 "Attention.project", "Attention.output", "MLP.forward"},
    "megaloop/model/injection.py": {"AddInjection", "ConcatAdapterInjection", "ParcaeInjection.coefficients",
                                    "ParcaeInjection.forward"},
    "megaloop/ops/short_conv.py": {"causal_depthwise_conv1d"},
    "megaloop/model/sparse_attention.py": {"indexer_rope", "indexer_key_norm"},
    "megaloop/model/value_embeddings.py": {"has_value_embedding", "value_embedding_layers", "ValueEmbedding",
                                           "attach_value_embeddings"},
    "megaloop/ops/gated_delta.py": {"_compute_dtype", "_check_shapes", "gated_delta_rule_recurrent",
                                    "gated_delta_rule_chunked"},
}


def _definitions(tree: ast.Module):
    """(qualified name, first line incl. decorators, node) of every function and class, nested ones too."""
    out = []

    def walk(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                out.append((prefix + node.name, start, node))
                walk(node.body, prefix + node.name + ".")
    walk(tree.body, "")
    return out


def find(tree: ast.Module, qualname: str):
    for name, _, node in _definitions(tree):
        if name == qualname:
            return node
    return None


class _Normalise(ast.NodeTransformer):
    """Drop docstrings; apply renames to every identifier (names, attributes, arguments, definitions)."""

    def __init__(self, renames):
        self.renames = renames

    def _rename(self, name):
        return self.renames.get(name, name)

    def _strip_docstring(self, node):
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]

    def visit_FunctionDef(self, node):
        self._strip_docstring(node)
        node.name = self._rename(node.name)
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self._strip_docstring(node)
        node.name = self._rename(node.name)
        return self.generic_visit(node)

    def visit_Name(self, node):
        node.id = self._rename(node.id)
        return node

    def visit_Attribute(self, node):
        node.attr = self._rename(node.attr)
        return self.generic_visit(node)

    def visit_arg(self, node):
        node.arg = self._rename(node.arg)
        return self.generic_visit(node)

    def visit_keyword(self, node):
        if node.arg is not None:
            node.arg = self._rename(node.arg)
        return self.generic_visit(node)


def normalise(node: ast.AST, renames=None) -> str:
    node = _Normalise(renames or {}).visit(copy.deepcopy(node))
    return ast.unparse(ast.fix_missing_locations(node))


def parse_renames(text):
    if not text:
        return {}
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    out = {}
    for p in pairs:
        old, arrow, new = p.partition("->")
        assert arrow and old.strip() and new.strip(), f"bad rename {p!r}: write old->new"
        out[old.strip()] = new.strip()
    return out


def markers(path: Path):
    """(line number, source path, source name, renames, copied node) per marker in `path`."""
    text = path.read_text()
    tree = ast.parse(text)
    defs = _definitions(tree)
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines, start=1):
        m = MARKER.match(line)
        if m is None:
            continue
        # The marked definition starts at the next line that is neither blank nor a comment.
        nxt = next(j for j in range(i + 1, len(lines) + 1)
                   if lines[j - 1].strip() and not lines[j - 1].lstrip().startswith("#"))
        node = next((n for _, start, n in defs if start == nxt), None)
        assert node is not None, f"{path.name}:{i}: the marker is not right above a def or class"
        out.append((i, m["path"], m["name"], parse_renames(m["renames"]), node))
    return out


def compare(source_node, copy_node, renames) -> str:
    """'' when the copy matches the source, else a unified diff of the normalised sources."""
    want, got = normalise(source_node, renames), normalise(copy_node)
    if want == got:
        return ""
    return "\n".join(difflib.unified_diff(want.splitlines(), got.splitlines(), "source (renamed)", "copy",
                                          lineterm=""))


ALL_MARKERS = [(f, *m) for f in sorted(TEMPLATE_DIR.glob("*.py")) for m in markers(f)]


@pytest.mark.parametrize("template, line, src, name, renames, node", ALL_MARKERS,
                         ids=[f"{f.name}:{line}:{name}" for f, line, _, name, _, _ in ALL_MARKERS])
def test_marked_copy_matches_its_source(template, line, src, name, renames, node):
    source_file = ROOT / src
    assert source_file.exists(), f"{template.name}:{line}: {src} does not exist"
    source = find(ast.parse(source_file.read_text()), name)
    assert source is not None, f"{template.name}:{line}: {src} has no {name}"
    diff = compare(source, node, renames)
    assert not diff, (f"{template.name}:{line} is marked as a copy of {src}:{name}, but differs from it; "
                      f"update the copy (or its declared renames):\n{diff}")


def test_expected_copies_are_marked():
    found = {}
    for _, _, src, name, _, _ in ALL_MARKERS:
        found.setdefault(src, set()).add(name)
    missing = {src: sorted(names - found.get(src, set())) for src, names in EXPECTED.items()}
    assert not any(missing.values()), f"copies without their '# Copied from' marker: {missing}"


def test_the_check_catches_a_changed_copy_and_honours_renames():
    src = ast.parse("def f(x, eps=1e-6):\n    '''doc'''\n    y = x.float()  # note\n    return g(y) + eps\n")
    same = ast.parse("def f(x, eps=1e-6):\n    return g(x.float()) + eps\n")  # not the same statements
    renamed = ast.parse("def h(x, eps=1e-6):\n    y = x.float()\n    return k(y) + eps\n")
    formatted = ast.parse("def f(x,\n      eps=1e-6):\n    y = x.float()\n    return g(y) + eps\n")
    assert compare(src.body[0], formatted.body[0], {}) == ""
    assert compare(src.body[0], same.body[0], {}) != ""
    assert compare(src.body[0], renamed.body[0], {}) != ""
    assert compare(src.body[0], renamed.body[0], {"f": "h", "g": "k"}) == ""
