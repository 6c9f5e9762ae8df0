"""Wikipedia markup to clean prose paragraphs, for the demo's general texts.

Handles what the English dumps in the gensim test data hold: nested templates ``{{...}}``, tables
``{| ... |}``, links ``[[target|text]]`` (file, image and category links dropped), references, comments,
HTML tags, bold/italic quotes, headings and lists.
"""

from __future__ import annotations

import html
import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref\b[^>/]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_DROP_TAGS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|source|pre|imagemap|chem)\b[^>]*>.*?</\1\s*>", re.S | re.I
)
_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", re.S)  # innermost {{...}}
_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)  # innermost {| ... |}
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # innermost [[...]]
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_DROP_NAMESPACES = ("file", "image", "media", "category")
_INTERWIKI = re.compile(r"^:?[a-z]{2,3}(?:-[a-z]+)?:")
_TAG = re.compile(r"</?[a-zA-Z][^<>]*?/?>")
_BOLD_ITALIC = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]+__")


def _replace_until_stable(pattern: re.Pattern, repl: str | Callable, text: str) -> str:
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _link_text(match: re.Match) -> str:
    inner = match.group(1)
    target, _, label = inner.partition("|")
    prefix = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if prefix.lstrip(":") in _DROP_NAMESPACES or _INTERWIKI.match(target.strip()) and not label:
        return ""
    if label:
        return label.rsplit("|", 1)[-1]
    return target.lstrip(":").split("#", 1)[0] if not target.startswith("#") else target[1:]


def strip_wiki_markup(text: str) -> str:
    """Turn MediaWiki source into plain prose paragraphs separated by blank lines.

    Removes comments, `<ref>` citations, templates `{{...}}` (nested), tables `{| ... |}`, file/image/
    category and interlanguage links, html tags, headings, list/indent lines and bold/italic quotes;
    `[[target|label]]` becomes `label`, `[[target]]` becomes `target`, `[http://x label]` becomes `label`.
    """
    text = html.unescape(text) if "&lt;" in text else text  # raw dumps read without an XML parser
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_TAGS.sub("", text)
    # templates and tables can nest in each other: strip innermost ones until nothing changes
    while True:
        new = _replace_until_stable(_TABLE, "\n", _replace_until_stable(_TEMPLATE, "", text))
        if new == text:
            break
        text = new
    text = _replace_until_stable(_LINK, _link_text, text)
    text = _EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = _TAG.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")

    lines = []
    for line in text.split("\n"):
        stripped = line.strip()
        # headings, lists, indents, definition lists, table remnants and unbalanced template leftovers
        # break a paragraph instead of joining the text around them
        if not stripped or stripped[0] in "=*#:;|!{}" or stripped.startswith(("}}", "----")):
            lines.append("")
            continue
        # "(; born 1900)" or "(;,)" is what removed pronunciation/language templates leave behind
        stripped = re.sub(r"\s*\((?:\s*[,;])*\s*\)", "", stripped)
        stripped = re.sub(r"\((?:\s*[,;])+\s*", "(", stripped)
        stripped = re.sub(r",(?:\s*,)+", ",", stripped)
        stripped = re.sub(r"[ \t]+", " ", stripped)
        stripped = re.sub(r" +([,.;:!?)])", r"\1", stripped)
        stripped = re.sub(r"\( +", "(", stripped)
        lines.append(stripped.strip())
    paragraphs, current = [], []
    for line in lines:
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def iter_wiki_pages(xml_stream: io.IOBase) -> Iterator[tuple[str, str]]:
    """Yield `(title, wikitext)` for main-namespace, non-redirect pages of a MediaWiki XML export."""
    title, ns, text = "", "0", ""
    for _, elem in ET.iterparse(xml_stream, events=("end",)):
        tag = elem.tag.rsplit("}", 1)[-1]
        if tag == "title":
            title = elem.text or ""
        elif tag == "ns":
            ns = (elem.text or "").strip()
        elif tag == "text":
            text = elem.text or ""
        elif tag == "page":
            if ns == "0" and text and not text.lstrip().upper().startswith("#REDIRECT"):
                yield title, text
            title, ns, text = "", "0", ""
            elem.clear()


def _is_prose(paragraph: str, min_chars: int, max_chars: int) -> bool:
    return (
        min_chars <= len(paragraph) <= max_chars
        and paragraph[0].isupper()
        and paragraph[-1] in '.!?"'
        and paragraph.count(". ") >= 1
        and not any(s in paragraph for s in ("[[", "]]", "{{", "}}", "{|", "|}", "<", ">", "http", "|"))
    )


def wiki_paragraphs(
    pages: Iterable[tuple[str, str]], *, min_chars: int = 200, max_chars: int = 1200, max_per_article: int = 3
) -> list[dict[str, str]]:
    """Clean prose paragraphs `{"id", "title", "text"}` from `(title, wikitext)` pages, in page order.

    At most `max_per_article` per article so that the replay set covers many topics.
    """
    out, seen = [], set()
    for title, source in pages:
        kept = 0
        for k, para in enumerate(strip_wiki_markup(source).split("\n\n")):
            if kept >= max_per_article:
                break
            if para in seen or not _is_prose(para, min_chars, max_chars):
                continue
            seen.add(para)
            out.append({"id": f"enwiki:{title}:{k}", "title": title, "text": para})
            kept += 1
    return out
