"""The one XML parser for provider answers: no entities expanded, no network, no huge trees.

The flags are set explicitly because lxml's defaults have changed between releases. An answer
that declares entities is refused outright: no provider document uses them, and refusing is the
simplest defence against external entities and entity-expansion bombs.
"""

from __future__ import annotations

import re

from lxml import etree

from bus.errors import ProviderPayloadError

_ENCODING = re.compile(rb"\A\s*<\?xml[^>]*?\bencoding\s*=\s*[\"']([A-Za-z0-9._-]+)")
_DECLARATION = re.compile(r"\A\s*<\?xml[^>]*\?>")

PARSER = etree.XMLParser(
    resolve_entities=False,
    no_network=True,
    huge_tree=False,
    load_dtd=False,
    dtd_validation=False,
    remove_comments=True,
    remove_pis=True,
)


def parse_xml(body: bytes) -> etree._Element:
    """The root element of a provider's XML answer, or ProviderPayloadError. An answer that
    is not UTF-8 and declares no other encoding is read as windows-1251: ePochta's document
    gives its answers no declaration nor a charset, and its ids are the sender's own, Cyrillic
    ones included; refusing such an answer would lose the statuses of every id in it."""
    if b"<!ENTITY" in body or b"<!DOCTYPE" in body:
        raise ProviderPayloadError("answer declares a DTD or entities; refused")
    try:
        root = etree.fromstring(body.strip(), PARSER)
    except (etree.XMLSyntaxError, ValueError) as exc:
        if (root := _in_windows_1251(body)) is None:
            raise ProviderPayloadError(f"answer is not well-formed XML: {exc}") from None
    if root is None:
        raise ProviderPayloadError("answer is empty")
    return root


def _in_windows_1251(body: bytes) -> etree._Element | None:
    """The answer read as windows-1251, when it is not UTF-8 and declares no other encoding
    (or UTF-8, which it then is not); None when that does not apply or does not help."""
    declared = _ENCODING.match(body)
    if declared is not None and declared[1].lower() not in (b"utf-8", b"utf8"):
        return None
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        text = body.decode("cp1251", errors="replace").strip()
        try:  # without its declaration, whose encoding would no longer be the text's
            return etree.fromstring(_DECLARATION.sub("", text, count=1).encode(), PARSER)
        except (etree.XMLSyntaxError, ValueError):
            return None
    return None  # UTF-8 as it should be, and not well-formed XML


def text(element: etree._Element | None, path: str) -> str | None:
    """Stripped text of the first `path` below `element`, None when absent or empty."""
    if element is None:
        return None
    found = element.find(path)
    if found is None or found.text is None:
        return None
    value = str(found.text).strip()
    return value or None


def fields(element: etree._Element) -> dict[str, str | None]:
    """The stripped text of each child of `element` by tag, as `text` reads one of them (the
    first child of a tag; None when empty), in one pass over the children: an answer carries up
    to a hundred reports, each read for several fields."""
    found: dict[str, str | None] = {}
    for child in element:
        tag = child.tag
        if isinstance(tag, str) and tag not in found:
            value = child.text
            found[tag] = (str(value).strip() or None) if value is not None else None
    return found
