"""XML in and out of the table of contents: safe parsing, namespace-blind lookup, faithful writing.

The TOC comes from untrusted packages, so it is parsed with defusedxml and any DTD or entity
declaration is refused. xar readers (libxar, libarchive) match elements by local name, and Apple
writes ``<KeyInfo xmlns="http://www.w3.org/2000/09/xmldsig#">`` with a default namespace; the
writer here reproduces exactly that shape instead of ElementTree's ``ns0:`` prefixes.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator

import defusedxml
import defusedxml.ElementTree as DET

from .errors import MalformedTocError, UnsafeTocError


def escape(text: str) -> str:
    """``xml.sax.saxutils.escape``'s output (that module imports urllib and http, a tenth of start-up)."""
    return text.replace("&", "&amp;").replace(">", "&gt;").replace("<", "&lt;")


def quoteattr(value: str) -> str:
    """``xml.sax.saxutils.quoteattr``'s output: escaped, newlines and tabs as references, quoted."""
    value = escape(value).replace("\n", "&#10;").replace("\r", "&#13;").replace("\t", "&#9;")
    if '"' not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    return '"{}"'.format(value.replace('"', "&quot;"))


XMLDSIG_NS = "http://www.w3.org/2000/09/xmldsig#"
_XML_NS = "http://www.w3.org/XML/1998/namespace"

Element = ET.Element


MAX_DEPTH = 256  # real TOCs nest as deep as the package's directories
MAX_ELEMENTS = 1_000_000  # about 15 per file: some 60,000 files


class _TooBig(Exception):
    pass


class _LimitedBuilder(ET.TreeBuilder):
    """Stops building before a hostile TOC exhausts memory or the recursion limit."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = self.count = 0

    def start(self, tag: str, attrs: dict[str, str]) -> Element:
        self.depth += 1
        self.count += 1
        if self.depth > MAX_DEPTH:
            raise _TooBig(f"nests elements more than {MAX_DEPTH} deep")
        if self.count > MAX_ELEMENTS:
            raise _TooBig(f"has more than {MAX_ELEMENTS} elements")
        return super().start(tag, attrs)

    def end(self, tag: str) -> Element:
        self.depth -= 1
        return super().end(tag)


def parse_xml(data: bytes, name: str) -> Element:
    parser = DET.DefusedXMLParser(
        target=_LimitedBuilder(), forbid_dtd=True, forbid_entities=True, forbid_external=True
    )
    try:
        parser.feed(data)
        return parser.close()
    except _TooBig as e:
        raise MalformedTocError(f"{name}: the table of contents {e}; refusing to read it") from None
    except (defusedxml.DTDForbidden, defusedxml.EntitiesForbidden, defusedxml.ExternalReferenceForbidden) as e:
        raise UnsafeTocError(
            f"{name}: the table of contents declares a DTD or entities ({type(e).__name__}); "
            "packages never need them, so it is refused"
        ) from None
    except ET.ParseError as e:
        raise MalformedTocError(f"{name}: the table of contents is not well-formed XML ({e})") from None


def local_name(tag: str) -> str:
    return tag.rpartition("}")[2]


def children(element: Element, name: str) -> Iterator[Element]:
    """Direct children with this local name, whatever their namespace."""
    return (child for child in element if isinstance(child.tag, str) and local_name(child.tag) == name)


def child(element: Element, name: str) -> Element | None:
    return next(children(element, name), None)


def make(tag: str, text: str | None = None, **attributes: str) -> Element:
    element = ET.Element(tag, attributes)
    element.text = text
    return element


def indent(element: Element, level: int) -> None:
    """Indent a newly built subtree to sit ``level`` deep in a one-space-indented TOC."""
    ET.indent(element, space=" ", level=level)


def serialize(root: Element) -> bytes:
    """The document as UTF-8 bytes with an XML declaration, namespaces as default declarations."""
    parts: list[str] = ['<?xml version="1.0" encoding="UTF-8"?>\n']
    _write(root, "", parts)
    return "".join(parts).encode("utf-8")


def _write(element: Element, default_ns: str, parts: list[str]) -> None:
    namespace, _, name = element.tag.rpartition("}")
    namespace = namespace[1:]
    attributes: list[str] = []
    if namespace != default_ns:
        attributes.append(f"xmlns={quoteattr(namespace)}")
    prefixes: dict[str, str] = {}
    for key, value in element.attrib.items():
        attr_ns, _, attr_name = key.rpartition("}")
        attr_ns = attr_ns[1:]
        if not attr_ns:
            attributes.append(f"{attr_name}={quoteattr(value)}")
        elif attr_ns == _XML_NS:
            attributes.append(f"xml:{attr_name}={quoteattr(value)}")
        else:
            prefix = prefixes.setdefault(attr_ns, f"ns{len(prefixes)}")
            attributes.append(f"{prefix}:{attr_name}={quoteattr(value)}")
    attributes += [f"xmlns:{prefix}={quoteattr(uri)}" for uri, prefix in prefixes.items()]
    opening = " ".join([name, *attributes])
    if element.text is None and len(element) == 0:
        parts.append(f"<{opening}/>")
    else:
        parts.append(f"<{opening}>")
        if element.text:
            parts.append(escape(element.text))
        for sub in element:
            _write(sub, namespace, parts)
            if sub.tail:
                parts.append(escape(sub.tail))
        parts.append(f"</{name}>")
