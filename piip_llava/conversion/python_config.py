"""Read the released checkpoints' Python config files as data.

The official PIIP-LLaVA code names its vision config as a Python file (`mm_vision_tower =
"configs/<name>.py"`) and imports it. We never import or execute it: the file is parsed with
`ast` and only literals, lists, tuples, dicts and `dict(...)` calls with keyword arguments are
accepted; anything else (names, attribute access, other calls, comprehensions, imports) is refused
with the line it was found on.
"""

from __future__ import annotations

import ast
import copy
import os


class UnsafeConfigError(ValueError):
    """The Python config file holds something other than plain data."""


def _refuse(node: ast.AST, source_name: str, what: str) -> UnsafeConfigError:
    line = getattr(node, "lineno", "?")
    return UnsafeConfigError(
        f"{source_name}, line {line}: {what} is not plain data. Only literals, lists, tuples, dicts and dict(...) "
        f"calls with keyword arguments are read from released config files; nothing in them is executed."
    )


def _value(node: ast.AST, source_name: str, names: dict | None = None):
    if isinstance(node, ast.Name) and names is not None and node.id in names:
        return copy.deepcopy(names[node.id])
    if isinstance(node, ast.Constant):
        if node.value is Ellipsis or isinstance(node.value, bytes):
            raise _refuse(node, source_name, f"the constant {node.value!r}")
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _value(node.operand, source_name, names)
        if isinstance(operand, bool) or not isinstance(operand, (int, float)):
            raise _refuse(node, source_name, "a sign applied to a non-number")
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.List):
        return [_value(element, source_name, names) for element in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_value(element, source_name, names) for element in node.elts)
    if isinstance(node, ast.Dict):
        if any(key is None for key in node.keys):
            raise _refuse(node, source_name, "a `**` expansion inside a dict")
        return {_value(key, source_name, names): _value(value, source_name, names) for key, value in zip(node.keys, node.values)}
    if isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id == "dict"):
            raise _refuse(node, source_name, f"the call {ast.unparse(node.func)}(...)")
        if node.args:
            raise _refuse(node, source_name, "a dict(...) call with positional arguments")
        if any(keyword.arg is None for keyword in node.keywords):
            raise _refuse(node, source_name, "a `**` expansion inside dict(...)")
        return {keyword.arg: _value(keyword.value, source_name, names) for keyword in node.keywords}
    raise _refuse(node, source_name, f"a {type(node).__name__} expression")


def parse_python_config(source: str, source_name: str = "<config>", skip_non_data: bool = False) -> dict:
    """The top-level assignments of a released config file, as a dict of plain Python values.

    With `skip_non_data` (mmdet / mmseg configs, whose pipelines hold `**` expansions and which
    refer to their own earlier assignments), a name assigned earlier in the file stands for its
    value, and statements that are not plain data are left out instead of refused; nothing is
    executed either way.
    """
    try:
        tree = ast.parse(source, filename=source_name)
    except SyntaxError as error:
        raise UnsafeConfigError(f"{source_name} is not valid Python: {error}") from error
    names = {}
    for statement in tree.body:
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # a docstring or bare string
        try:
            if not isinstance(statement, ast.Assign):
                raise _refuse(statement, source_name, f"a {type(statement).__name__} statement")
            if len(statement.targets) != 1 or not isinstance(statement.targets[0], ast.Name):
                raise _refuse(statement, source_name, "an assignment to something other than one plain name")
            names[statement.targets[0].id] = _value(statement.value, source_name, names if skip_non_data else None)
        except UnsafeConfigError:
            if not skip_non_data:
                raise
    return names


def read_python_config(path: str | os.PathLike) -> dict:
    """Parse a released config file; returns its `model` dict (with `backbone` and `projector`)."""
    with open(path, encoding="utf-8") as handle:
        names = parse_python_config(handle.read(), source_name=str(path))
    model = names.get("model")
    if not isinstance(model, dict) or "backbone" not in model:
        raise ValueError(f"{path} does not define `model = dict(backbone=..., projector=...)`.")
    return model


__all__ = ["UnsafeConfigError", "parse_python_config", "read_python_config"]
