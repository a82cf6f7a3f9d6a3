"""NER tag schemes: parsing tags, detecting and validating IOB1/IOB2/BIOES, rewriting IOB1 to IOB2, entity spans.

Tags are kept per word through prepare; IOB1 is rewritten to IOB2 there (the entities are the same), so every
later step sees either IOB2 or BIOES, told apart by the label set alone (scheme_of).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunepipe.errors import UserError

if TYPE_CHECKING:
    from tunepipe.tasks.ner.data import Sentence


def parse_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', '')."""
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix not in ("B", "I", "E", "S") or not kind:
        return "?", ""
    return prefix, kind

def scheme_of(labels: list[str]) -> str:
    """The stored scheme, read off the label set: BIOES has E-/S- tags, IOB2 has not."""
    return "BIOES" if any(parse_tag(lab)[0] in ("E", "S") for lab in labels) else "IOB2"


def seqeval_scheme(labels: list[str]):
    """seqeval's scheme class for the stored label set (strict mode checks chunks against it)."""
    from seqeval.scheme import IOB2, IOBES

    return IOBES if scheme_of(labels) == "BIOES" else IOB2


def _iob2_violation(s: Sentence) -> tuple[int, str] | None:
    """First I-X that does not continue an X entity (IOB2 needs B-X first)."""
    prev = ("O", "")
    for i, tag in enumerate(s.tags):
        prefix, kind = parse_tag(tag)
        if prefix == "I" and (prev[0] not in ("B", "I") or prev[1] != kind):
            return i, f"{tag} cannot follow {s.tags[i - 1] if i else 'the sentence start'}"
        prev = (prefix, kind)
    return None


def _iob1_violation(s: Sentence) -> tuple[int, str] | None:
    """First B-X that is not between two X entities (IOB1 only uses B- to split adjacent same-type entities)."""
    prev = ("O", "")
    for i, tag in enumerate(s.tags):
        prefix, kind = parse_tag(tag)
        if prefix == "B" and (prev[0] not in ("B", "I") or prev[1] != kind):
            return i, f"{tag} after {s.tags[i - 1] if i else 'the sentence start'} (IOB1 starts entities with I-)"
        prev = (prefix, kind)
    return None


def _bioes_violation(s: Sentence) -> tuple[int, str] | None:
    """I-X/E-X must continue a B-X/I-X of the same type, and every B-X/I-X must be continued."""
    prev = ("O", "")
    for i, tag in enumerate([*s.tags, "O"]):
        prefix, kind = parse_tag(tag)
        open_entity = prev[0] in ("B", "I")
        continues = open_entity and prefix in ("I", "E") and kind == prev[1]
        if prefix in ("I", "E") and not continues:
            return i, f"{tag} cannot follow {s.tags[i - 1] if i else 'the sentence start'}"
        if open_entity and not continues:
            return i - 1, f"{s.tags[i - 1]} is not closed by I-/E-{prev[1]}" + (
                "" if i < len(s.tags) else " before the sentence ends")
        prev = (prefix, kind)
    return None


def _first_violation(sentences: list[Sentence], check) -> tuple[Sentence, int, str] | None:
    for s in sentences:
        hit = check(s)
        if hit:
            return s, hit[0], hit[1]
    return None


def detect_and_validate(sentences: list[Sentence], scheme: str) -> str:
    """Check every tag against `scheme` (auto: detect it); returns the scheme found (IOB1, IOB2 or BIOES)."""
    prefixes: set[str] = set()
    for s in sentences:
        for i, tag in enumerate(s.tags):
            prefix = parse_tag(tag)[0]
            if prefix == "?":
                raise UserError(f"{s.where(i)}: tag {tag!r} is not O or PREFIX-TYPE with PREFIX one of B, I, E, S")
            prefixes.add(prefix)
    if scheme == "BIO":
        scheme = "IOB2"
    bioes = bool(prefixes & {"E", "S"})
    if scheme == "auto":
        if bioes:
            scheme = "BIOES"
        else:
            bad_iob2 = _first_violation(sentences, _iob2_violation)
            bad_iob1 = _first_violation(sentences, _iob1_violation) if bad_iob2 else None
            if bad_iob2 and bad_iob1:
                s, i, why = bad_iob2
                s1, i1, _ = bad_iob1
                raise UserError(f"{s.where(i)}: {why}: not IOB2, and {s1.tags[i1]} at {s1.where(i1)} rules out IOB1; "
                                "fix the tags (or set data.tag_scheme to the scheme the file should follow)")
            scheme = "IOB1" if bad_iob2 else "IOB2"
    elif bioes and scheme != "BIOES":
        s, i = next((s, i) for s in sentences for i, t in enumerate(s.tags) if parse_tag(t)[0] in ("E", "S"))
        raise UserError(f"{s.where(i)}: tag {s.tags[i]!r} is not allowed in {scheme} (data.tag_scheme); "
                        "set data.tag_scheme: BIOES or auto")
    check = {"IOB1": _iob1_violation, "IOB2": _iob2_violation, "BIOES": _bioes_violation}[scheme]
    bad = _first_violation(sentences, check)
    if bad:
        s, i, why = bad
        hint = " (set data.tag_scheme: IOB1 if the file uses IOB1)" if scheme == "IOB2" else ""
        raise UserError(f"{s.where(i)}: {why}, which {scheme} does not allow; fix the tag{hint}")
    return scheme


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """An I-X that opens an entity becomes B-X; the entities do not change."""
    out, prev = [], ("O", "")
    for tag in tags:
        prefix, kind = parse_tag(tag)
        if prefix == "I" and (prev[0] == "O" or prev[1] != kind):
            tag = f"B-{kind}"
        out.append(tag)
        prev = (prefix, kind)
    return out


def entity_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first word, end word) of each entity in valid IOB2/BIOES tags: each starts with B- or S-."""
    spans, i = [], 0
    while i < len(tags):
        prefix, kind = parse_tag(tags[i])
        end = i + 1
        if prefix == "B":
            while end < len(tags) and parse_tag(tags[end]) == ("I", kind):
                end += 1
            if end < len(tags) and parse_tag(tags[end]) == ("E", kind):
                end += 1
        if prefix in ("B", "S"):
            spans.append((kind, i, end))
        i = end
    return spans


def mention_tags(kind: str, n: int, scheme: str) -> list[str]:
    if scheme == "BIOES":
        return [f"S-{kind}"] if n == 1 else [f"B-{kind}", *[f"I-{kind}"] * (n - 2), f"E-{kind}"]
    return [f"B-{kind}", *[f"I-{kind}"] * (n - 1)]
