"""A griffe extension for the API reference (mkdocs.yml): smar's docstrings as Markdown.

smar's docstrings are Google style with two reST habits that griffe's Google parser and
Markdown do not read:

- one ``Args:`` entry may name several parameters (``text, image, router: as in mrd``); it
  becomes one entry per parameter, with the same text (griffe would warn that ``text, image`` is
  no parameter of the signature, which ``mkdocs build --strict`` refuses);
- Sphinx roles (``:func:`mrd```, ``:class:`smar.collective.StepSums```, ``:meth:``, ``:attr:``,
  ``:mod:``, ``:data:``, ``:exc:``) become links to the object's entry where the API reference
  shows it, and plain code where it does not (an optional cross-reference: never a warning).

A function wrapped at module level (``z_loss = _checks_inputs(baselines.z_loss)``, as
``smar.losses`` wraps the losses of ``smar.baselines`` with ``functools.wraps``) is shown as the
function it wraps, with its signature, rather than as an attribute without a docstring.

And three for the reader: doctest lines (``>>> ...``) become a ``pycon`` code block (Markdown
reads ``>>>`` as nested quotes), the lines of a ``Shapes:`` (or ``Shape legend:``) section keep
their line breaks (Markdown would run them into one line), and a citation of a page,
``docs/method.md#mrd``, becomes a link to it (from ``docs/api/``, where the API pages are;
mkdocs checks the page, tests/test_api_docs.py the anchor).

A role's name is looked up as Sphinx would: from the object's own scope outwards (its class,
its module, the enclosing packages), then as a full ``smar.`` path, then as the one object of
smar whose path ends with it. ``double-backtick`` literals need nothing: they are Markdown code.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):`(~?)([\w.]+?)(\(\))?`")
SECTION = re.compile(
    r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Keyword Arguments|Other Parameters"
    r"|Attributes):\s*$"
)
MULTI = re.compile(r"^(\s+)(\*{0,2}\w+(?:,\s*\*{0,2}\w+)+):(\s.*)?$")
SHAPES = re.compile(r"^(\s*)(?:Shapes|Shape legend):\s*$")
PAGE = re.compile(r"(?<![\w/.])docs/([\w-]+\.md)(#[\w-]+)?")
CODE = re.compile(r"(``.+?``|`[^`]+`|<code>.*?</code>)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_entries(text: str) -> str:
    """``a, b: text`` inside an Args-like section becomes ``a: text`` and ``b: text``; the lines
    of a ``Shapes:`` section end with a line break."""
    lines = text.splitlines()
    out: list[str] = []
    section: int | None = None  # the indent of the current Args-like header
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() and section is not None and _indent(line) <= section:
            section = None
        shapes = SHAPES.match(line)
        if shapes:  # its lines as written: each ends with a line break
            block = []
            for extra in lines[i + 1 :]:
                if extra.strip() and _indent(extra) <= len(shapes.group(1)):
                    break
                block.append(extra)
            while block and not block[-1].strip():
                block.pop()
            out.append(line)
            out.extend(b + "<br>" if b.strip() and k < len(block) - 1 else b
                       for k, b in enumerate(block))  # fmt: skip
            i += 1 + len(block)
            continue
        header = SECTION.match(line)
        if header:
            section = len(header.group(1))
            out.append(line)
            i += 1
            continue
        multi = MULTI.match(line) if section is not None else None
        if multi and len(multi.group(1)) > section:  # type: ignore[operator]
            indent = len(multi.group(1))
            rest = [lines[j] for j in range(i + 1, len(lines))]
            cont: list[str] = []
            for extra in rest:
                if extra.strip() and _indent(extra) <= indent:
                    break
                cont.append(extra)
            while cont and not cont[-1].strip():
                cont.pop()
            for name in (n.strip() for n in multi.group(2).split(",")):
                out.append(f"{multi.group(1)}{name}:{multi.group(3) or ''}")
                out.extend(cont)
            i += 1 + len(cont)
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def fence_doctests(text: str) -> str:
    """A run of doctest lines (``>>>``, its ``...`` continuations and output) in a code block."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not lines[i].lstrip().startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = " " * _indent(lines[i])
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


def link_pages(text: str) -> str:
    """``docs/x.md#anchor`` outside code becomes a link to the page, from ``docs/api/``."""
    parts = CODE.split(text)
    for k in range(0, len(parts), 2):  # the even parts are outside code
        parts[k] = PAGE.sub(
            lambda m: f"[{m.group(0)}](../{m.group(1)}{m.group(2) or ''})", parts[k]
        )
    return "".join(parts)


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)  # type: ignore[arg-type]


class SmarDocstrings(griffe.Extension):
    """Rewrites the docstrings of the ``smar`` package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "smar":
            return
        self._unwrap(pkg)
        objects = list(_objects(pkg))
        self.paths: dict[str, str] = {}  # every path of smar (aliases too) -> its canonical path
        for obj in objects:
            self.paths[obj.path] = obj.path
            for alias in obj.members.values():
                if alias.is_alias:
                    try:
                        target = alias.final_target.path  # type: ignore[union-attr]
                    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                        continue
                    if target.split(".")[0] == "smar":
                        self.paths[alias.path] = target
        for obj in objects:
            if obj.docstring is not None:
                text = split_entries(obj.docstring.value)
                text = ROLE.sub(lambda m, o=obj: self._role(m, o), text)
                obj.docstring.value = link_pages(fence_doctests(text))

    def _unwrap(self, pkg: griffe.Module) -> None:
        """``name = wrapper(smar_function)`` becomes an alias of ``smar_function``."""
        for module in [o for o in _objects(pkg) if o.is_module]:
            for name, member in list(module.members.items()):
                if member.is_alias or not member.is_attribute:
                    continue
                call = member.value  # type: ignore[union-attr]
                if not isinstance(call, griffe.ExprCall) or len(call.arguments) != 1:
                    continue
                path = getattr(call.arguments[0], "canonical_path", "")
                try:
                    target = pkg[path.removeprefix("smar.")] if path.startswith("smar.") else None
                except KeyError:
                    continue
                if target is not None and not target.is_alias and target.is_function:
                    module.set_member(name, griffe.Alias(name, target, parent=module))

    def _resolve(self, name: str, obj: griffe.Object) -> str | None:
        scope: griffe.Object | None = obj if obj.is_class or obj.is_module else obj.parent
        while scope is not None:
            found = self.paths.get(f"{scope.path}.{name}")
            if found:
                return found
            scope = scope.parent
        if name in self.paths:
            return self.paths[name]
        ends = {p for p in self.paths.values() if p.endswith("." + name)}
        return ends.pop() if len(ends) == 1 else None

    def _role(self, match: re.Match[str], obj: griffe.Object) -> str:
        tilde, name, call = match.group(1), match.group(2), match.group(3) or ""
        title = (name.rsplit(".", 1)[-1] if tilde else name) + call
        code = f"<code>{html.escape(title)}</code>"
        target = self._resolve(name, obj)
        if target is None:
            return code
        return f'<autoref identifier="{target}" optional>{code}</autoref>'
