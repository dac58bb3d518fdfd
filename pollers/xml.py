"""The one XML parser for provider answers: no entities expanded, no network, no huge trees.

The flags are set explicitly because lxml's defaults have changed between releases. An answer
that declares entities is refused outright: no provider document uses them, and refusing is the
simplest defence against external entities and entity-expansion bombs.
"""

from __future__ import annotations

from lxml import etree

from bus.errors import ProviderPayloadError

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
    """The root element of a provider's XML answer, or ProviderPayloadError."""
    if b"<!ENTITY" in body or b"<!DOCTYPE" in body:
        raise ProviderPayloadError("answer declares a DTD or entities; refused")
    try:
        root = etree.fromstring(body.strip(), PARSER)
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise ProviderPayloadError(f"answer is not well-formed XML: {exc}") from None
    if root is None:
        raise ProviderPayloadError("answer is empty")
    return root


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
