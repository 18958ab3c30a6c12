"""Chat templates (`chat_template.jinja`): the Jinja dialect `transformers` renders them in, with bounds.

A chat template ships with the model, so it is code from whoever made the checkpoint. `transformers` renders it in
Jinja's sandbox (no attribute escapes) but without bounds: nested `range(100000)` loops or `'a' * 4000000000` run
until the process is killed. This module is the one place that knows the dialect: the exporter and the builder
compile a template with it before copying it (a syntax error is caught there), the runtime renders with it. It
renders exactly as `tokenizer.apply_chat_template` does (same environment options, globals and filters; the tests
compare real templates), within two bounds:
- time: a wall-clock deadline, checked on every line the compiled template runs (a trace hook on the template's own
  frames; a loop over a list or a range runs no sandbox hook at all);
- size: every string, list or number a template builds stays under `max_chars`, checked after each operator,
  filter and call, and before the ones that can outgrow their inputs in one step (`*`, `**`, format widths, counts,
  `replace`, `join`); the rendered text too.
Everything that stops a render — a bound, the template's own `raise_exception(...)` (real templates use it for a bad
role order), `{% include %}`, a sandbox refusal, a Python error inside the template — is one InputError naming the
request.
"""

from __future__ import annotations

import json
import re
import sys
import time
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache, wraps

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from contract.errors import InputError

MAX_SECONDS = 1.0  # real templates render in about a millisecond
MAX_CHARS = 1 << 24  # default size bound (characters of a string, items of a list) when the caller gives none
FILENAME = "<chat template>"  # the compiled template's frames carry this name; the deadline traces only them


class TemplateLimit(jinja2.TemplateError):
    """A template ran past its time or size bound."""


class TemplateRaised(jinja2.TemplateError):
    """The template called `raise_exception(message)`."""


_max_chars_var: ContextVar[int] = ContextVar("chat_template_max_chars", default=MAX_CHARS)


def _max_chars() -> int:
    return _max_chars_var.get()


def _sized(value):
    """`value`, after checking that a string, list, mapping or integer it is stays within the size bound."""
    limit = _max_chars()
    if isinstance(value, (str, list, tuple, dict)) and len(value) > limit:
        raise TemplateLimit(f"it built a value of {len(value)} characters or items, more than the limit {limit}")
    if isinstance(value, int) and value.bit_length() > 64 and abs(value) > limit:
        raise TemplateLimit(f"it built a number of {value.bit_length()} bits")
    return value


def _count(value) -> None:
    """A count argument (`center(n)`, `indent(n)`, a repeat) larger than the size bound can only build too much."""
    if isinstance(value, int) and abs(value) > _max_chars():
        raise TemplateLimit(f"it asked for a count of {value}, more than the limit {_max_chars()}")


_PRINTF_SPEC = re.compile(r"%[-+ #0]*(\d*)(?:\.(\d*))?[a-zA-Z%]")  # '%999999999s': width, precision
_PRINTF_STAR = re.compile(r"%[-+ #0]*(\*|\d*\.\*)")  # '%*s', '%.*s': a width or precision from the arguments
_FORMAT_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}")  # '{:>999999999}': the spec after the colon


def _widths(fmt: str) -> None:
    """`'%999999999s' % x` and `'{:>999999999}'.format(x)` pad to their width: check each width and precision."""
    numbers = [n for m in _PRINTF_SPEC.finditer(fmt) for n in m.groups() if n]
    numbers += [n for spec in _FORMAT_SPEC.findall(fmt) for n in re.findall(r"\d+", spec)]
    for digits in numbers:
        if len(digits) > len(str(_max_chars())) or int(digits) > _max_chars():
            raise TemplateLimit(f"it formats with a width of {digits}, more than the limit {_max_chars()}")


def _replace_size(s: str, old: str, new: str, count: int = -1) -> None:
    n = len(s) + 1 if old == "" else s.count(old)
    n = n if count is None or count < 0 else min(n, count)
    if len(s) + n * (len(new) - len(old)) > _max_chars():
        raise TemplateLimit(f"a replace would build more than {_max_chars()} characters")


def _join_size(sep: str, items: list) -> None:
    size = len(sep) * max(len(items) - 1, 0) + sum(len(x) for x in items if isinstance(x, str))
    if size > _max_chars():
        raise TemplateLimit(f"a join would build more than {_max_chars()} characters")


class _BoundedCodeGenerator(CodeGenerator):
    """`a ~ b` (Jinja's string concatenation) goes through the environment, like the intercepted operators."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame) -> None:
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` marks assistant text for training masks; a prompt
    needs only its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _NoIncludes(jinja2.BaseLoader):
    def get_source(self, environment, template):
        raise jinja2.TemplateNotFound(template, f"{{% include/import/extends %}} of {template!r}: a chat template "
                                                "must be self-contained")


class _TemplateNamespace(Namespace):
    """`namespace(...)` as transformers gives it: no underscore attributes."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_', found {name!r}")


class _TemplateDict:
    """`dict(...)` as transformers gives it, without the type itself (no `dict.__subclasses__` hackery)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' `tojson`: plain json.dumps (Jinja's own escapes HTML characters)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _bounded_filter(name: str, f):
    @wraps(f)  # keeps Jinja's pass_context / pass_eval_context marker
    def run(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            _count(value)
        values = [a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.nodes.EvalContext,
                                                        jinja2.Environment))]
        if name == "replace" and len(values) >= 3 and isinstance(values[0], str):
            _replace_size(values[0], str(values[1]), str(values[2]), values[3] if len(values) > 3 else -1)
        elif name == "join" and values and not kwargs.get("attribute") and len(values) < 3:
            items = list(values[0])
            _join_size(str(values[1]) if len(values) > 1 else str(kwargs.get("d", "")), items)
            args = (*args[: len(args) - len(values)], items, *values[1:])
        elif name == "format" and values and isinstance(values[0], str):
            _widths(values[0])
        return _sized(f(*args, **kwargs))

    return run


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment (sandboxed, trim/lstrip blocks, loop controls, `{% generation %}`,
    `raise_exception`, `strftime_now`, `tojson`, `namespace`, `dict`) with the bounds of the module docstring."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, loader=_NoIncludes(),
                         extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                            namespace=_TemplateNamespace)

    def concat(self, parts) -> str:
        parts = [str(p) for p in parts]
        if sum(map(len, parts)) > _max_chars():
            raise TemplateLimit(f"a ~ concatenation would build more than {_max_chars()} characters")
        return "".join(parts)

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _max_chars():
                    raise TemplateLimit(f"it repeats a value {n} times, more than the limit {_max_chars()}")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right * left.bit_length() > 4096:
                raise TemplateLimit(f"it raises {left} to the power {right}")
        elif operator == "%" and isinstance(left, str):
            _widths(left)
            if _PRINTF_STAR.search(left):  # '%*s' % (999999999, x): the width comes from the arguments
                for value in right if isinstance(right, tuple) else (right,):
                    _count(value)
        return _sized(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        for value in (*args, *kwargs.values()):
            _count(value)
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
        if isinstance(owner, str):
            if name in ("format", "format_map"):
                _widths(owner)
            elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
                _replace_size(owner, args[0], args[1], args[2] if len(args) > 2 else -1)
            elif name == "join" and args:
                args = (list(args[0]), *args[1:])
                _join_size(owner, args[0])
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def _compile(self, source: str, filename: str):
        return super()._compile(source, FILENAME)


_ENVIRONMENT = BoundedEnvironment()


@lru_cache(maxsize=32)
def _compiled(source: str) -> jinja2.Template:
    return _ENVIRONMENT.from_string(source)


def compile_template(source: str, where: str) -> jinja2.Template:
    """The compiled template; InputError naming `where` when it is not valid Jinja of this dialect."""
    try:
        return _compiled(source)
    except jinja2.TemplateSyntaxError as e:
        raise InputError(f"{where}: expected a Jinja chat template, found a syntax error at line {e.lineno}: "
                         f"{e.message}") from None
    except (jinja2.TemplateError, SyntaxError, RecursionError, MemoryError) as e:  # nesting too deep to compile
        raise InputError(f"{where}: expected a Jinja chat template, found one that does not compile "
                         f"({type(e).__name__}: {e})") from None


def _tracer(seconds: float):
    """A trace function that stops the template's own frames once `seconds` have passed."""
    deadline = time.monotonic() + seconds

    def line(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateLimit(f"it ran longer than the limit of {seconds:g} s")
        return line

    def call(frame, event, arg):
        return line if frame.f_code.co_filename == FILENAME else None

    return call


def render(template: jinja2.Template, where: str, *, max_chars: int = MAX_CHARS, seconds: float = MAX_SECONDS,
           **context) -> str:
    """`template` rendered with `context` within the bounds; InputError naming `where` on anything that stops it."""
    token = _max_chars_var.set(max_chars)
    previous = sys.gettrace()
    sys.settrace(_tracer(seconds))
    try:
        chunks, size = [], 0
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > max_chars:
                raise TemplateLimit(f"its output is longer than the limit of {max_chars} characters")
            chunks.append(chunk)
        return "".join(chunks)
    except TemplateLimit as e:
        raise InputError(f"{where}: the chat template was stopped: {e}") from None
    except TemplateRaised as e:
        raise InputError(f"{where}: the chat template refused it: {e}") from None
    except jinja2.TemplateNotFound as e:
        raise InputError(f"{where}: the chat template has {e.message}") from None
    except jinja2.exceptions.SecurityError as e:
        raise InputError(f"{where}: the chat template did something the sandbox forbids: {e}") from None
    except jinja2.TemplateError as e:
        raise InputError(f"{where}: the chat template failed: {e}") from None
    except (RecursionError, MemoryError) as e:
        raise InputError(f"{where}: the chat template was stopped: {type(e).__name__}") from None
    except Exception as e:  # a Python error inside the template's own code (TypeError, KeyError, ...)
        raise InputError(f"{where}: the chat template failed: {type(e).__name__}: {e}") from None
    finally:
        sys.settrace(previous)
        _max_chars_var.reset(token)
