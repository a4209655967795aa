"""Loading a config: YAML (strict: duplicate keys, non-mappings and syntax errors name file:line) -> dict ->
dataclasses, with type conversion, `section.key=value` overrides and near-miss suggestions; then
validation (megaloop.config.validation)."""
from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from megaloop.config.recipes import apply_recipe
from megaloop.config.schema import Config, ConfigError, yaml_key
from megaloop.config.validation import _suggest, validate


# ----------------------------------------------------------------------------------------------
# Loading: YAML -> dict -> dataclasses, with type conversion and near-miss suggestions.


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML / command-line value to the declared field type, or fail naming the field."""
    origin = typing.get_origin(annotation)
    if origin is Union:  # Optional[X]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        if len(args) > 1 and isinstance(value, tuple(a for a in args if isinstance(a, type))):
            return value  # Union[list, dict]: a value of one of the types stays as it is
        return _convert(value, args[0], where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if annotation is list or origin is list:
        if isinstance(value, str):
            value = _override_value(f"{where}={value}", value) if value.strip().startswith("[") else [value]
        if not isinstance(value, list):
            value = [value]
        return value
    return value


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> dict:
    """The section dataclass's resolved field types (resolving them is slow, and they never change)."""
    return typing.get_type_hints(cls)


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        if where:
            raise ConfigError(f"config section '{where}' must be a mapping (key: value), got {data!r}")
        raise ConfigError(f"config: the top level must be a mapping of sections (model:, train:, ...), got {data!r}")
    hints = _type_hints(cls)
    fields = {yaml_key(f): f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'{_suggest(str(key), fields)}")
        name = fields[key].name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, {} if value is None else value, path)  # `model:` alone = empty
        else:
            kwargs[name] = _convert(value, annotation, path)
    return cls(**kwargs)


def _override_value(override: str, raw: str) -> Any:
    """The YAML value of an override (`[a, b]`, `{length: 16}`, `3e-4`); a malformed one, or one with a YAML tag
    (`!!python/...`, never constructed: safe_load), is refused naming the override."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override '{override}': the value {raw!r} is not valid YAML ({' '.join(problem.split())}); "
                          f"write a list as [a, b], a mapping as {{key: value}}, quote text with [ {{ or !") from None


def _apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like section.key=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    node_cls, node = Config, tree
    for i, key in enumerate(keys):
        fields = {yaml_key(f): f for f in dataclasses.fields(node_cls)}
        prefix = ".".join(keys[:i])
        if key not in fields:
            place = f"'{prefix}'" if prefix else "the top level"
            raise ConfigError(f"override '{override}': unknown key '{key}' in {place}{_suggest(key, fields)}")
        hints = {yaml_key(f): _type_hints(node_cls)[f.name] for f in dataclasses.fields(node_cls)}
        if i == len(keys) - 1:
            if dataclasses.is_dataclass(hints[key]):
                raise ConfigError(f"override '{override}': '{dotted}' is a section; set one of its keys")
            # Strings stay verbatim (YAML would read "4:1" as the base-60 integer 241).
            node[key] = raw if hints[key] is str else _override_value(override, raw)
        else:
            if not dataclasses.is_dataclass(hints[key]):
                raise ConfigError(f"override '{override}': '{'.'.join(keys[:i + 1])}' is not a section")
            if node.get(key) is None:
                node[key] = {}
            elif not isinstance(node[key], dict):
                raise ConfigError(f"override '{override}': config section '{'.'.join(keys[:i + 1])}' must be a "
                                  f"mapping (key: value), got {node[key]!r}")
            node = node[key]
            node_cls = hints[key]


def config_from_dict(data: dict, overrides: Optional[list] = None) -> Config:
    if data is not None and not isinstance(data, dict):  # dict() would silently accept a list of pairs
        _build(Config, data, "")
    tree = dict(data or {})
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    for override in overrides or []:
        _apply_override(tree, override)
    cfg = _build(Config, apply_recipe(tree), "")  # the preset under the keys given (theirs win)
    validate(cfg)
    return cfg


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list] = None) -> Config:
    """Read a YAML config (or defaults when path is None), apply overrides, validate, return it."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = read_config_yaml(path)
    return config_from_dict(data, overrides)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, mark, first_mark):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.mark, self.first_mark = key, mark, first_mark


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` merges; its keys may be overridden on purpose
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _DuplicateKey(key, key_node.start_mark, seen[key])
                except TypeError:
                    continue  # an unhashable key: SafeLoader reports it itself
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _yaml_kind(value) -> str:
    return {list: "a list", str: "a string", type(None): "nothing"}.get(type(value), repr(value))


def read_config_yaml(path: Union[str, Path]) -> dict:
    """The mapping of a YAML config file. Refuses, in one line naming file and line: invalid YAML, a key
    given twice in one mapping, a top level that is not a mapping, a section that is not a mapping
    (`model: 0`; `model:` with nothing under it is an empty section)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot read it: {e}") from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        data = loader.construct_document(node)
    except _DuplicateKey as e:
        raise ConfigError(f"config file {path}:{e.mark.line + 1}: duplicate key {e.key!r} (first given at line "
                          f"{e.first_mark.line + 1}); YAML would silently keep the last one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        cmark = getattr(e, "context_mark", None)
        if context and cmark is not None and cmark is not mark:
            problem = f"{problem} ({context} at line {cmark.line + 1})"
        raise ConfigError(f"config file {where}: invalid YAML: {' '.join(str(problem).split())}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections (model:, train:, ...), "
                          f"got {_yaml_kind(data)} (line {node.start_mark.line + 1})")
    sections = {f.name for f in dataclasses.fields(Config)}
    for key_node, value_node in node.value:
        key = getattr(key_node, "value", None)
        if key in sections and data.get(key) is not None and not isinstance(data[key], dict):
            raise ConfigError(f"config file {path}: section '{key}' must be a mapping (key: value lines), got "
                              f"{data[key]!r} (line {value_node.start_mark.line + 1})")
    return data


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


