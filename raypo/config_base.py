"""The machinery under :mod:`raypo.config`, which holds every actual setting.

A config is a root dataclass whose dataclass-typed fields are sections of :class:`Section`
subclasses. This module turns YAML and ``--key value`` text into field types, checks bounds,
builds a config from nested mappings (unknown keys get a did-you-mean), reads attribute docstrings
with :mod:`ast`, and parses tune search-space expressions. Every problem is a :class:`ConfigError`
naming the dotted key, the value and its source. Nothing here knows a raypo setting.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import yaml

COMMAND_LINE = "command line"
"""The source named in errors about values given as overrides."""

NULLS = frozenset({"null", "none", "~"})
"""Command-line spellings of "unset" for a field that accepts null."""

_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_SEARCH_ARITY = {"uniform": 2, "loguniform": 2, "randint": 2, "choice": 1}
_SEARCH_EXPRESSION = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.DOTALL)


class ConfigError(ValueError):
    """A bad setting: names the dotted key, the value, the problem and the source."""

    def __init__(
        self, key: str | None, value: object, problem: str, source: str | None = None
    ) -> None:
        self.key, self.value, self.problem, self.source = key, value, problem, source
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.key is None:
            return f"{self.source}: {self.problem}" if self.source else self.problem
        origin = f" (from {self.source})" if self.source else ""
        return f"{self.key} = {self.value!r}{origin}: {self.problem}"

    def with_source(self, source: str) -> ConfigError:
        """The same error, saying where the value came from."""
        return ConfigError(self.key, self.value, self.problem, source)

    @property
    def errors(self) -> list[ConfigError]:
        """Every problem this error reports (one, unless it is a :class:`ConfigErrors`)."""
        return [self]


class ConfigErrors(ConfigError):
    """Several bad settings found together, so that one run reports all of them."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self._errors = [one for error in errors for one in error.errors]
        first = self._errors[0]
        super().__init__(first.key, first.value, first.problem, first.source)

    def __str__(self) -> str:
        return "\n".join(ConfigError.__str__(error) for error in self._errors)

    @property
    def errors(self) -> list[ConfigError]:
        return list(self._errors)


def combined(errors: Sequence[ConfigError]) -> ConfigError:
    """One error reporting ``errors`` (non-empty): itself when there is one."""
    flat = [one for error in errors for one in error.errors]
    return flat[0] if len(flat) == 1 else ConfigErrors(flat)


class Section:
    """Base of a config section dataclass: on construction each field is converted to its
    annotated type and checked against its ``bounded`` range, then :meth:`_validate` runs."""

    SECTION: ClassVar[str] = ""
    """Dotted prefix of the section's keys in errors ("" for the root)."""

    FOREIGN_NAMES: ClassVar[Mapping[str, str]] = {}
    """On the root: field names other tools use -> the hint given for them when they appear as
    an unknown key (``"bf16": "TRL's bf16 is model.dtype: bf16"``)."""

    def __post_init__(self) -> None:
        hints = field_types(type(self))
        errors: list[ConfigError] = []
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            try:
                value = coerce(value, hints[spec.name])
            except WrongType as wrong:
                errors.append(ConfigError(self._key(spec.name), value, f"expected {wrong}"))
                continue
            object.__setattr__(self, spec.name, value)
            bounds = spec.metadata.get("bounds")
            if bounds is not None and value is not None and not within(value, bounds):
                errors.append(ConfigError(self._key(spec.name), value, bounds_problem(bounds)))
        if errors:
            raise combined(errors)
        self._validate()

    def _validate(self) -> None:
        """Rules beyond types and bounds; each failure raises through :meth:`_require`."""

    def _key(self, name: str) -> str:
        return f"{self.SECTION}.{name}" if self.SECTION else name

    def _require(self, ok: bool, name: str, problem: str) -> None:
        if not ok:
            raise ConfigError(self._key(name), getattr(self, name), problem)


def bounded(default: Any, bounds: str) -> Any:
    """A dataclass field whose value (unless null) must satisfy ``bounds``: ``"> 0"``, ``">= 1"``
    or an interval such as ``"[0, 1)"``; :func:`describe_fields` reports it."""
    return field(default=default, metadata={"bounds": bounds})


@cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields (ClassVars left out)."""
    hints = get_type_hints(cls)
    return {spec.name: hints[spec.name] for spec in dataclasses.fields(cls)}


def sections_of(root: type) -> dict[str, type]:
    """Section name -> section dataclass, for the dataclass-typed fields of ``root``."""
    return {n: t for n, t in field_types(root).items() if dataclasses.is_dataclass(t)}


@cache
def index_fields(root: type) -> dict[str, Any]:
    """Every settable dotted key of ``root`` (``seed``, ``loss.beta``, ``model.lora.rank``: a
    section may hold sections) -> its annotation."""
    sections = sections_of(root)
    index: dict[str, Any] = {}
    for name, annotation in field_types(root).items():
        if name in sections:
            index.update({f"{name}.{k}": t for k, t in index_fields(sections[name]).items()})
        else:
            index[name] = annotation
    return index


class WrongType(Exception):
    """A value that cannot be read as its field's type; the message says what was expected."""


def without_null(annotation: Any) -> Any:
    """``X`` for ``X | None``; any other annotation unchanged."""
    if get_origin(annotation) in (Union, types.UnionType):
        return next(a for a in get_args(annotation) if a is not type(None))
    return annotation


def describe_type(annotation: Any) -> str:
    """What a field accepts, in words: ``a number``, ``one of a, b``, ``an integer or null``."""
    inner = without_null(annotation)
    if inner is not annotation:
        return f"{describe_type(inner)} or null"
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(get_args(annotation))
    if origin is list:
        return "a list of strings"
    if origin is dict:
        return "a mapping of strings to strings"
    return _NAMES.get(annotation, "a mapping (section)")


def unknown_choice(value: object, choices: list[str]) -> str:
    """``one of a, b, c; did you mean 'b'?`` for a value that is not among ``choices``."""
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"one of {', '.join(choices)}{hint}"


def coerce(value: Any, annotation: Any) -> Any:
    """``value`` as the type ``annotation`` (bool, int, float, str, Literal, X | None, list[str],
    dict[str, str]). Text is parsed (the command line; YAML's ``5e-7``, which YAML 1.1 reads as
    a string); ints widen to float; anything else of the wrong type raises :class:`WrongType`."""
    inner = without_null(annotation)
    if inner is not annotation:
        if value is None or (isinstance(value, str) and value.strip().lower() in NULLS):
            return None
        return coerce(value, inner)
    origin = get_origin(annotation)
    if origin is Literal:
        if isinstance(value, str) and value in get_args(annotation):
            return value
        raise WrongType(unknown_choice(value, list(get_args(annotation))))
    if origin in (list, dict):
        return _coerce_container(value, origin)
    if annotation not in _NAMES:
        if isinstance(value, annotation):
            return value
        raise WrongType(describe_type(annotation))
    if isinstance(value, str) and annotation is not str:
        return _parse_scalar(value, annotation)
    if isinstance(value, bool) and annotation is not bool:
        raise WrongType(describe_type(annotation))
    if annotation is float and isinstance(value, int | float):
        if math.isfinite(value):
            return float(value)
        raise WrongType("a finite number")
    if isinstance(value, annotation):
        return value
    raise WrongType(describe_type(annotation))


def _parse_scalar(text: str, annotation: type) -> Any:
    """``text`` read as a bool (true/false/yes/no/1/0), an int or a finite float."""
    stripped = text.strip().lower()
    if annotation is bool:
        if stripped in _BOOLS:
            return _BOOLS[stripped]
        raise WrongType(describe_type(bool))
    try:
        number = annotation(stripped)
    except ValueError:
        raise WrongType(describe_type(annotation)) from None
    if not math.isfinite(number):
        raise WrongType("a finite number")
    return number


def _coerce_container(value: Any, origin: type) -> Any:
    """A list of strings or a str -> str mapping; text is read as YAML (a list also as a,b,c)."""
    expected = describe_type(list[str] if origin is list else dict[str, str])
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value) if value.strip() else origin()
        except yaml.YAMLError:
            raise WrongType(expected) from None
        value = [part.strip() for part in parsed.split(",")] if isinstance(parsed, str) else parsed
    if origin is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if origin is dict and isinstance(value, Mapping):
        if all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return dict(value)
    raise WrongType(expected)


def within(value: float, bounds: str) -> bool:
    """Whether ``value`` satisfies ``bounds``: ``"> 0"``, ``">= 1"`` or an interval such as
    ``"[0, 1)"`` (square bracket = closed end, parenthesis = open end)."""
    if bounds[0] in "[(":
        low, high = (float(end) for end in bounds[1:-1].split(","))
        above = value >= low if bounds[0] == "[" else value > low
        below = value <= high if bounds[-1] == "]" else value < high
        return above and below
    operator, limit = bounds.split()
    return value > float(limit) if operator == ">" else value >= float(limit)


def bounds_problem(bounds: str) -> str:
    """The error text for a value outside ``bounds``: ``must be > 0``, ``must be in [0, 1)``."""
    return f"must be in {bounds}" if bounds[0] in "[(" else f"must be {bounds}"


def parse_search_expression(text: str) -> tuple[str, list[Any]]:
    """Split a tune search-space expression into its function and arguments.

    ``loguniform(0.01, 1.0)`` -> ``("loguniform", [0.01, 1.0])``; ``choice([dpo, ipo])`` ->
    ``("choice", [["dpo", "ipo"]])``. Functions: ``uniform(lo, hi)``, ``loguniform(lo, hi)``
    (lo > 0), ``randint(lo, hi)`` (integers, hi exclusive), ``choice([a, ...])`` (non-empty).
    Raises ValueError saying what is wrong.
    """
    match = _SEARCH_EXPRESSION.match(text)
    if match is None or match.group(1) not in _SEARCH_ARITY:
        raise ValueError(f"expected one of {', '.join(f'{n}(...)' for n in _SEARCH_ARITY)}")
    name = match.group(1)
    try:
        args = yaml.safe_load(f"[{match.group(2)}]")
    except yaml.YAMLError:
        raise ValueError(f"cannot read the arguments of {name}(...) as YAML") from None
    if len(args) != _SEARCH_ARITY[name]:
        raise ValueError(f"{name}(...) takes {_SEARCH_ARITY[name]} argument(s)")
    if name == "choice":
        if not (isinstance(args[0], list) and args[0]):
            raise ValueError("choice takes a non-empty list: choice([a, b])")
        return name, args
    kind = int if name == "randint" else int | float
    if not all(isinstance(a, kind) and not isinstance(a, bool) for a in args):
        raise ValueError(f"{name}(lo, hi) takes two {'integers' if kind is int else 'numbers'}")
    if not args[0] < args[1]:
        raise ValueError(f"{name}(lo, hi) needs lo < hi")
    if name == "loguniform" and args[0] <= 0:
        raise ValueError("loguniform(lo, hi) needs lo > 0")
    return name, args


def parse_overrides(tokens: Sequence[str]) -> list[tuple[str, str]]:
    """``["--loss.beta", "0.2", "--seed=3", "trainer.use_gpu=true"]`` -> (key, text) pairs."""
    pairs: list[tuple[str, str]] = []
    position = 0
    while position < len(tokens):
        token = tokens[position]
        key, has_value, value = token.removeprefix("--").partition("=")
        position += 1
        if not token.startswith("--") and not has_value:
            problem = f"unexpected {token!r}; an override is --section.field VALUE"
            raise ConfigError(None, token, problem, COMMAND_LINE)
        if not has_value:
            if position >= len(tokens) or tokens[position].startswith("--"):
                raise ConfigError(key, None, f"--{key} needs a value", COMMAND_LINE)
            value = tokens[position]
            position += 1
        pairs.append((key, value))
    return pairs


def read_yaml(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``; a missing file or bad YAML is a ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(None, None, "no such config file", str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "unreadable"
        raise ConfigError(None, None, f"invalid YAML{where}: {problem}", str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(None, None, "the top level must be a mapping of sections", str(path))
    return data


def record_origins(data: Mapping[str, Any], prefix: str, source: str, out: dict[str, str]) -> None:
    """Note ``source`` for every dotted key (at every depth) in ``data``."""
    for key, value in data.items():
        out[f"{prefix}{key}"] = source
        if isinstance(value, Mapping):
            record_origins(value, f"{prefix}{key}.", source, out)


def origin_of(origins: Mapping[str, str], key: str | None) -> str:
    """Where the value of ``key`` (or of its nearest recorded parent) came from."""
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return "defaults"


@cache
def attribute_docstrings(source_file: str, class_name: str) -> dict[str, str]:
    """Field name -> docstring (the string literal after the field), each on one line, of the
    class ``class_name`` defined at the top level of ``source_file``."""
    tree = ast.parse(Path(source_file).read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    docs: dict[str, str] = {}
    for stmt, after in zip(node.body, node.body[1:], strict=False):
        is_field = isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
        if is_field and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


@dataclass(frozen=True)
class FieldHelp:
    """What ``raypo config fields`` prints for one setting."""

    key: str
    """Dotted key, e.g. ``loss.beta``."""
    type: str
    """The accepted values, in words."""
    bounds: str | None
    """Range of a numeric field (``> 0``, ``[0, 1)``), if it has one."""
    default: Any
    """Default value."""
    help: str
    """The field's docstring on one line."""


def describe_fields(root: type) -> list[FieldHelp]:
    """Every settable field of ``root`` and its nested sections, in order, documented from the
    source file of the class that declares each field."""
    rows = []
    for key, annotation in index_fields(root).items():
        cls, spec = _field_spec(root, key)
        default = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
        source_file = inspect.getsourcefile(cls)
        doc = attribute_docstrings(source_file, cls.__name__).get(spec.name, "")
        bounds = spec.metadata.get("bounds")
        rows.append(FieldHelp(key, describe_type(annotation), bounds, default, doc))
    return rows


def _field_spec(root: type, key: str) -> tuple[type, dataclasses.Field[Any]]:
    """The dataclass declaring the dotted ``key`` of ``root``, and its field."""
    *path, name = key.split(".")
    cls = root
    for section in path:
        cls = sections_of(cls)[section]
    return cls, next(s for s in dataclasses.fields(cls) if s.name == name)


def suggest(key: str, keys: Sequence[str], foreign: Mapping[str, str] = {}) -> str:
    """``; did you mean X?`` for an unknown dotted key: the hint for a field name another tool
    uses (``foreign``), else the same field name in another section, else the closest key of its
    own section, else the closest field name anywhere."""
    section, _, name = key.rpartition(".")
    if name in foreign:
        return f"; {foreign[name]}"
    by_name = {k.rpartition(".")[2]: k for k in keys}
    own = [k for k in keys if k.rpartition(".")[0] == section]
    close = [by_name[name]] if name in by_name else difflib.get_close_matches(key, own, n=1)
    if not close:
        close = [by_name[m] for m in difflib.get_close_matches(name, list(by_name), n=1)]
    return f"; did you mean {close[0]}?" if close else ""


def build(root: type, data: Mapping[str, Any]) -> Any:
    """``root`` built from nested mappings (YAML's shape); unknown keys and sections, and bad
    values, raise one error that lists every problem found (a section with a bad value is not
    checked against the others)."""
    sections, index = sections_of(root), index_fields(root)
    foreign = getattr(root, "FOREIGN_NAMES", {})
    kwargs: dict[str, Any] = {}
    errors: list[ConfigError] = []
    for key, value in data.items():
        try:
            if key in sections:
                kwargs[key] = _build_section(sections[key], str(key), value, index, foreign)
            elif key in index:
                kwargs[key] = value
            elif isinstance(value, Mapping):
                close = difflib.get_close_matches(str(key), list(sections), n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                problem = f"unknown section (the sections are {', '.join(sections)}){hint}"
                raise ConfigError(str(key), dict(value), problem)
            else:
                hint = suggest(str(key), list(index), foreign)
                raise ConfigError(str(key), value, "unknown key" + hint)
        except ConfigError as error:
            errors.append(error)
    if not errors:
        return root(**kwargs)
    try:
        root(**kwargs)
    except ConfigError as error:
        # Top-level values are checked too; checks across sections are not, as a section that
        # failed stands at its defaults here.
        errors += [one for one in error.errors if "." not in (one.key or "")]
    raise combined(errors)


def _build_section(
    cls: type, section: str, data: Any, index: Mapping[str, Any], foreign: Mapping[str, str]
) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        raise ConfigError(section, data, f"must be a mapping of {section} fields")
    nested = sections_of(cls)
    kwargs: dict[str, Any] = {}
    errors: list[ConfigError] = []
    for name, value in data.items():
        key = f"{section}.{name}"
        try:
            if name in nested:
                value = _build_section(nested[name], key, value, index, foreign)
            elif key not in index:
                raise ConfigError(key, value, "unknown key" + suggest(key, list(index), foreign))
            kwargs[name] = value
        except ConfigError as error:
            errors.append(error)
    try:
        built = cls(**kwargs)
    except ConfigError as error:
        errors.append(error)
    if errors:
        raise combined(errors)
    return built


def set_override(raw: dict[str, Any], key: str, value: str, index: Mapping[str, Any]) -> None:
    """Put one override into the nested mapping ``raw``: ``section.field``, a nested section's
    ``section.sub.field``, or ``section.mapping_field.KEY``, which sets one entry of a mapping
    field (``tune.search_space.loss.beta``)."""
    parts = key.split(".")
    target = raw
    for depth in range(1, len(parts)):
        path, name = ".".join(parts[:depth]), parts[depth - 1]
        if path in index:
            if depth == 1 or get_origin(index[path]) is not dict:
                hint = "" if depth == 1 else suggest(key, list(index))
                raise ConfigError(key, value, f"{path} has no sub-fields{hint}", COMMAND_LINE)
            entries = target.get(name)
            entries = entries if isinstance(entries, dict) else {}
            target[name] = {**entries, ".".join(parts[depth:]): value}
            return
        if not isinstance(target.get(name), dict):
            target[name] = {}
        target = target[name]
    target[parts[-1]] = value


def check_search_entry(key: str, expression: str, root: type, grid: bool, where: str) -> None:
    """Check a search-space entry ``key: expression`` against the field of ``root`` it sets: the
    key exists (and is not a search setting), the expression fits the field's type and range.
    Errors are reported under the dotted key ``where``; ``grid``: only ``choice`` is allowed."""
    own_section = where.partition(".")[0]
    settable = [k for k in index_fields(root) if k.partition(".")[0] != own_section]
    if key not in settable:
        close = difflib.get_close_matches(key, settable, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(where, expression, "is not a config field a trial can set" + hint)
    annotation, bounds = index_fields(root)[key], _field_spec(root, key)[1].metadata.get("bounds")
    numeric = without_null(annotation)
    try:
        name, args = parse_search_expression(expression)
        if name == "choice":
            values = args[0]
        elif numeric in (int, float) and (numeric is int) == (name == "randint"):
            values = [args[0], args[1] - 1 if name == "randint" else args[1]]
        else:
            takes = describe_type(annotation)
            raise ValueError(f"{name}(...) does not fit {key}, which takes {takes}")
        for value in values:
            value = coerce(value, annotation)
            if bounds is not None and value is not None and not within(value, bounds):
                raise ValueError(f"{value!r} is outside {key}'s range: {bounds_problem(bounds)}")
    except WrongType as wrong:
        raise ConfigError(where, expression, f"each choice must be {wrong}") from None
    except ValueError as error:
        raise ConfigError(where, expression, str(error)) from None
    if grid and name != "choice":
        raise ConfigError(where, expression, "a grid search takes only choice([...])")


def formats_with(template: str, **names: str) -> bool:
    """Whether ``template.format(**names)`` succeeds, i.e. it uses only those placeholders."""
    try:
        template.format(**names)
    except (KeyError, IndexError, ValueError):
        return False
    return True


def _parents(key: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b"]``."""
    parts = key.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def load_tree(root: type, path: str | Path | None, overrides: Sequence[str]) -> Any:
    """``root``'s defaults, then the YAML file at ``path`` (optional), then ``overrides``; built
    and validated, a :class:`ConfigError` naming the source of the value it is about."""
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        raw = read_yaml(Path(path))
        record_origins(raw, "", str(path), origins)
    for key, value in parse_overrides(overrides):
        set_override(raw, key, value, index_fields(root))
        origins[key] = COMMAND_LINE
        for parent in _parents(key):
            origins.setdefault(parent, COMMAND_LINE)
    try:
        return build(root, raw)
    except ConfigError as error:
        found = [one.with_source(origin_of(origins, one.key)) for one in error.errors]
        raise combined(found) from None
