"""Tools an agent can call: plain functions made into `Tool`s by `@tool`, their arguments typed by the annotations
and described by the docstring (its first paragraph is what the model reads).

    @tool
    def calculator(expression: str) -> str:
        '''Evaluate an arithmetic expression such as (3 + 4) * 2 ** 3.'''

The built-in tools: `calculator` (a safe evaluator over Python's `ast`, never `eval`), and, bound to a model or an
index by their factories, `caption` and `transcribe` (`model_tools`, also `ask_image`) and `search` (`search_tool`).
"""
from __future__ import annotations

import ast
import inspect
import json
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

TYPES = {str: "str", int: "int", float: "float", bool: "bool"}


class ToolError(ValueError):
    """A tool call that cannot run: unknown tool, bad arguments, or the tool's own refusal; the text says why."""


@dataclass
class Tool:
    """A named function with typed parameters (name -> type, in order), the required ones, and a description."""

    name: str
    description: str
    params: dict[str, type]
    required: tuple[str, ...]
    fn: Callable[..., Any]

    def signature(self) -> str:
        """e.g. `search(query: str, k: int = 3)`."""
        defaults = {k: p.default for k, p in inspect.signature(self.fn).parameters.items()}
        parts = [f"{k}: {TYPES[t]}" + ("" if k in self.required else f" = {defaults[k]!r}")
                 for k, t in self.params.items()]
        return f"{self.name}({', '.join(parts)})"

    def bind(self, args: dict | str | int | float | None) -> dict:
        """Keyword arguments from a dict, or from one bare value for a tool with one required parameter; each value
        converted to its parameter's type."""
        if args is None or args == "":
            args = {}
        if not isinstance(args, dict):
            if len(self.required) != 1 and len(self.params) != 1:
                raise ToolError(f"{self.signature()} takes named arguments: give a JSON object such as "
                                f"{json.dumps(dict.fromkeys(self.params, '...'))}")
            args = {(self.required or tuple(self.params))[0]: args}
        unknown = [k for k in args if k not in self.params]
        if unknown:
            raise ToolError(f"{self.name} has no argument {unknown[0]!r}; its arguments: {', '.join(self.params)}")
        missing = [k for k in self.required if k not in args]
        if missing:
            raise ToolError(f"{self.name} needs argument {missing[0]!r}: {self.signature()}")
        return {k: _convert(v, self.params[k], self.name, k) for k, v in args.items()}

    def __call__(self, args: dict | str | None = None) -> str:
        """Run the tool on its arguments and return its result as text."""
        return str(self.fn(**self.bind(args)))


def _convert(value, kind: type, tool_name: str, arg: str):
    if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            if str(value).lower() in ("true", "false"):
                return str(value).lower() == "true"
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ToolError(f"{tool_name}: argument {arg!r} must be {TYPES[kind]}, got {value!r:.80}") from None


def tool(fn: Callable | None = None, *, name: str | None = None):
    """Decorator: a function with annotated str/int/float/bool parameters and a docstring -> a `Tool`."""
    def make(f: Callable) -> Tool:
        doc = inspect.getdoc(f)
        if not doc:
            raise TypeError(f"tool {f.__name__}: write a docstring; it is the description the model reads")
        params, required = {}, []
        for k, p in inspect.signature(f).parameters.items():
            if p.annotation not in TYPES and p.annotation not in TYPES.values():
                raise TypeError(f"tool {f.__name__}: parameter {k!r} needs an annotation of str, int, float or bool")
            named = {v: t for t, v in TYPES.items()}  # "str" under `from __future__ import annotations`
            params[k] = p.annotation if isinstance(p.annotation, type) else named[p.annotation]
            if p.default is inspect.Parameter.empty:
                required.append(k)
        return Tool(name or f.__name__, doc.split("\n\n")[0].replace("\n", " "), params, tuple(required), f)

    return make if fn is None else make(fn)


def describe(tools: dict[str, Tool]) -> str:
    """One line per tool for the prompt: signature, colon, description."""
    return "\n".join(f"{t.signature()}: {t.description}" for t in tools.values())


def registry(*tools: Tool) -> dict[str, Tool]:
    """Tools by name; two with one name is an error."""
    out = {}
    for t in tools:
        if t.name in out:
            raise ValueError(f"two tools are named {t.name!r}")
        out[t.name] = t
    return out


# ------------------------------------------------------------------------------------------------ calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_EXPRESSION = 500  # characters
MAX_BITS = 4096  # the largest integer a step may produce: 2**4096 has 1234 digits


def evaluate(expression: str):
    """The value of an arithmetic expression: numbers, + - * / // % **, parentheses, pi and e. Anything else (names,
    calls, attributes, subscripts...) and results past MAX_BITS are refused with a ToolError."""
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"expression of {len(expression)} characters; the limit is {MAX_EXPRESSION}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ToolError(f"not an arithmetic expression: {expression!r} ({e.msg})") from None
    return _eval(tree.body)


def _eval(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and a not in (0, 1, -1):
            bits = abs(b) * math.log2(abs(a)) if abs(a) > 0 else 0
            if bits > MAX_BITS:
                raise ToolError(f"{a} ** {b} is too large (about 2**{bits:.0f}; the limit is 2**{MAX_BITS})")
        try:
            value = _BINARY[type(node.op)](a, b)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("the result overflows a float") from None
        if isinstance(value, int) and value.bit_length() > MAX_BITS:
            raise ToolError(f"the result has {value.bit_length()} bits; the limit is {MAX_BITS}")
        if isinstance(value, complex):
            raise ToolError("the result is a complex number")
        if isinstance(value, float) and not math.isfinite(value):
            raise ToolError("the result is not a finite number")
        return value
    what = {ast.Call: "function calls", ast.Attribute: "attribute access", ast.Subscript: "subscripts",
            ast.Name: "names other than pi and e", ast.Lambda: "lambdas"}.get(type(node), type(node).__name__)
    if isinstance(node, ast.Constant):
        what = f"{type(node.value).__name__} values"
    raise ToolError(f"the calculator takes numbers and + - * / // % ** only; not allowed: {what}")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses, e.g. (3 + 4) * 2 ** 3."""
    value = evaluate(expression)
    return repr(round(value, 12)) if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------------ model and index


def model_tools(model, files: dict[str, str] | None = None) -> list[Tool]:
    """`caption`, `transcribe` and `ask_image` over a model with `caption` / `transcribe` / `chat` (`mm.load()`);
    a file argument is a path or the name of one of the task's `files` (name -> path, e.g. {"image1": "scene.png"})."""
    tools, modalities = [], getattr(model, "modalities", ())  # a fusion model's: "image", "speech"

    def path(name: str) -> str:
        return (files or {}).get(name.strip(), name)

    if "image" in modalities:
        @tool
        def caption(image: str) -> str:
            """Describe an image file: what it shows, in one sentence."""
            return model.caption(path(image))

        @tool
        def ask_image(image: str, question: str) -> str:
            """Answer a question about an image file, e.g. what colour is the star?"""
            content = [{"type": "image", "image": path(image)}, {"type": "text", "text": "\n" + question}]
            return model.chat([{"role": "user", "content": content}])

        tools += [caption, ask_image]
    if "speech" in modalities or type(model).__name__ == "ASRModel":
        @tool
        def transcribe(audio: str) -> str:
            """Transcribe an audio file (speech to text)."""
            return model.transcribe(path(audio))

        tools.append(transcribe)
    return tools


def search_tool(find: Callable[[str, int], list]) -> Tool:
    """`search` over any function (query, k) -> hits with source, location, score and text (`mm.rag.Index.search`)."""
    @tool
    def search(query: str, k: int = 3) -> str:
        """Search the indexed documents; returns the best passages with their sources."""
        hits = find(query, k)
        if not hits:
            return "no passages found"
        return "\n".join(f"[{n}] {h.source} {h.location}: {' '.join(h.text.split())[:400]}"
                         for n, h in enumerate(hits, 1))

    return search


def index_search(db: str) -> Callable[[str, int], list]:
    """The search function of an `mm rag index` directory."""
    from mm.rag.index import Index

    index = Index.open(db)
    return lambda query, k: index.search(query, k=k)
