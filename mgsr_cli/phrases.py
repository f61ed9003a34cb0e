"""The built-in `phrases` span prior: an offline rule-based chunker for noun, verb and
prepositional phrases of English text.

It lives apart from spans.py because it is a self-contained grammar (word lists, a tagger and a
greedy chunker) that knows nothing of tokens; spans.py maps its character ranges onto tokens.

Words are tagged with coarse classes: first from closed-class word lists, then, for open
words, from suffixes and the tag before them. The tags are then grouped greedily:
  NP = DET* [NUM|POSS|ADJ|NOUN]* (an adverb inside only before one of these), or a pronoun
  PP = preposition + the NP after it (the preposition alone if none follows)
  VP = [AUX|MODAL|NEG|ADV|TO_INF|VERB]+ holding at least one AUX, MODAL, TO_INF or VERB
Punctuation, line breaks, conjunctions, subordinators and lone adverbs end phrases and belong
to none.
"""

from __future__ import annotations

import re


# Words, punctuation marks, and line breaks (which end a phrase like punctuation does).
_WORD = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]|\n")

_CLOSED_CLASSES: dict[str, frozenset[str]] = {
    "DET": frozenset(
        "the a an this these those my your his her its our their some any each every no all both either neither "
        "many much few several such another what which whose".split()
    ),
    "SUBJ": frozenset("i you he she it we they who".split()),
    "PRON": frozenset(
        "me him us them myself yourself himself herself itself ourselves themselves yourselves mine yours hers ours "
        "theirs someone everyone anyone somebody everybody anybody nobody something everything anything nothing "
        "whom whoever whatever that's what's there's here's let's who's i'm you're we're they're he's she's it's "
        "i've you've we've they've i'll you'll we'll they'll he'll she'll it'll i'd you'd we'd they'd".split()
    ),
    "PREP": frozenset(
        "of in on at by for with from about into onto over under between among through during before after above "
        "below across against along around behind beyond despite except inside outside near toward towards upon "
        "within without via per like unlike throughout until till amid beside besides beneath off than".split()
    ),
    "CONJ": frozenset("and or but nor yet so".split()),
    "SUB": frozenset(
        "because although though while if unless whereas whether that when where how why once since as".split()
    ),
    "AUX": frozenset(
        "am is are was were be been being have has had having do does did isn't aren't wasn't weren't haven't "
        "hasn't hadn't don't doesn't didn't".split()
    ),
    "MODAL": frozenset(
        "can could will would shall should may might must can't cannot couldn't won't wouldn't shouldn't "
        "mustn't".split()
    ),
    "NEG": frozenset(["not", "never"]),
    "ADV": frozenset(
        "very also often always just still already even too quite rather really almost usually then here now soon "
        "however therefore thus sometimes again more most less least well only perhaps maybe".split()
    ),
    "NUM": frozenset(
        "one two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty hundred thousand "
        "million billion first second third last".split()
    ),
    "TO": frozenset(["to"]),
}
_LEXICON = {word: tag for tag, words in _CLOSED_CLASSES.items() for word in words}

# Common verbs (base forms); their regular inflections are recognised by suffix stripping.
_VERBS = frozenset(
    "be have do say make go take get know think see come want look use find give tell work call try ask need feel "
    "become leave put mean keep let begin seem help talk turn start show hear play run move live believe hold "
    "bring happen write provide sit stand lose pay meet include continue set learn change lead understand watch "
    "follow stop create speak read allow add spend grow open walk win offer remember love consider appear buy wait "
    "serve die send expect build stay fall cut reach kill remain suggest raise pass sell require report decide pull "
    "explain describe list identify summarize summarise classify generate compare improve reduce increase produce "
    "develop contain apply avoid choose cook eat drink jump sleep travel visit enjoy prefer hope plan prepare "
    "protect support train predict measure solve answer translate rewrite define discuss determine ensure check "
    "cause involve focus depend remove return carry share teach study fill drive draw break catch throw "
    "pick drop rise fly swim sing dance clean wash mix cover".split()
)
_IRREGULAR_VERB_FORMS = frozenset(
    "made took given gave went gone got gotten found thought knew known saw seen came said told wrote written "
    "became began begun brought built kept left led meant ran sent showed shown held stood understood taught bought "
    "chose chosen drew drawn drove driven ate eaten fell fallen felt forgot forgotten grew grown heard hid hit hurt "
    "lost paid put read rose sat sold spoke spoken spent stole struck swam threw thrown won wore worn did done "
    "broke broken caught flew flown sang sung".split()
)
# Suffixes that rarely end a noun; an adjective read as a noun still lands in the same noun phrase.
_ADJECTIVE_SUFFIXES = ("ous", "ful", "ive", "able", "ible", "ical", "less", "ish")
_LY_NON_ADVERBS = frozenset(
    "family supply reply apply only early daily likely friendly lovely ugly holy italy july assembly butterfly "
    "jelly belly rally ally fly rely monopoly anomaly imply multiply comply weekly monthly yearly costly elderly "
    "lonely silly orderly curly bully lily holly hourly".split()
)
# Tags after which a word ending in -s/-ed that follows a noun is read as that noun's verb.
_CLAUSE_CONTINUATIONS = frozenset(["DET", "PRON", "SUBJ", "PREP", "ADV", "NUM", "TO", "NEG", "POSS"])
_CLAUSE_STARTS = (None, "PUNCT", "CONJ", "SUB")
_NP_TAGS = frozenset(["DET", "NUM", "POSS", "ADJ", "NOUN"])
_NP_HEADS = frozenset(["NUM", "POSS", "ADJ", "NOUN"])
_VP_TAGS = frozenset(["AUX", "MODAL", "NEG", "ADV", "TO_INF", "VERB"])
_VP_CORES = frozenset(["AUX", "MODAL", "TO_INF", "VERB"])


def phrase_ranges(text: str) -> list[tuple[int, int]]:
    """Character ranges of the noun, verb and prepositional phrases of text, in order."""
    matches = list(_WORD.finditer(text))
    tags = _tag_words([match.group() for match in matches])
    return [(matches[first].start(), matches[last - 1].end()) for first, last in _chunk(tags)]


def _lexical_tag(word: str) -> str:
    """The tag a lowercase word has on its own: PUNCT (line breaks too), NUM for digits, a
    closed class, POSS for "...'s", ADV for "-ly" adverbs, else OPEN."""
    if not word[0].isalnum() and word[0] != "_":
        return "PUNCT"
    if word[0].isdigit():
        return "NUM"
    if word in _LEXICON:
        return _LEXICON[word]
    if word.endswith(("'s", "’s")):
        return "POSS"
    return "ADV" if _is_adverb(word) else "OPEN"


def _verb_inflection(word: str) -> str | None:
    """ "base", "s", "ed", "ing" or "irregular" when word is a form of a known verb, else None."""
    if word in _VERBS:
        return "base"
    if word in _IRREGULAR_VERB_FORMS:
        return "irregular"
    stems = {
        "s": [word[:-1], word[:-2]] if word.endswith("s") else [],
        "ed": [word[:-2], word[:-1], word[:-3]] if word.endswith("ed") else [],
        "ing": [word[:-3], word[:-3] + "e", word[:-4]] if word.endswith("ing") else [],
    }
    for inflection, candidates in stems.items():
        if any(stem in _VERBS for stem in candidates):
            return inflection
    return None


def _is_adverb(word: str) -> bool:
    return word.endswith("ly") and len(word) > 4 and word not in _LY_NON_ADVERBS


def _content_tag(word: str) -> str:
    return "ADJ" if len(word) > 4 and word.endswith(_ADJECTIVE_SUFFIXES) else "NOUN"


def _open_tag(word: str, capitalised: bool, context: str | None, context_word: str, following: str | None) -> str:
    """Tag an open-class word from its form, the tag (and word) before it, adverbs skipped,
    and the lexical tag after it."""
    if capitalised and context not in _CLAUSE_STARTS:
        return "NOUN"  # a proper noun
    inflection = _verb_inflection(word)
    if context in ("SUBJ", "MODAL", "TO_INF", "NEG"):
        return "VERB"
    if context == "AUX":
        return "VERB" if inflection or word.endswith(("ing", "ed", "en")) else _content_tag(word)
    if context == "NOUN" and following in _CLAUSE_CONTINUATIONS:
        # "the fox jumps over", "the model trained on", "students learn the", "the Earth orbits the"
        singular_subject = not context_word.endswith("s") or context_word.endswith(("ss", "is", "us"))
        finite = inflection in ("s", "ed", "irregular") or (word.endswith("ed") and len(word) > 4)
        third_person = word.endswith("s") and not word.endswith(("ss", "us", "is")) and singular_subject
        object_follows = following in ("DET", "PRON", "SUBJ", "NUM", "POSS")
        plural_subject = inflection == "base" and not singular_subject
        return "VERB" if finite or plural_subject or (third_person and object_follows) else _content_tag(word)
    if context in _CLAUSE_STARTS:
        return "VERB" if inflection in ("base", "ing") else _content_tag(word)  # imperative, gerund
    if context == "PREP" and word.endswith("ing"):
        return "VERB"  # "by using"
    return _content_tag(word)


def _tag_words(words: list[str]) -> list[str]:
    """One coarse tag per word (see the grammar above)."""
    lowered = [word.lower() for word in words]
    tags = [_lexical_tag(word) for word in lowered]
    context: str | None = None  # the last tag that is not an adverb, and its word
    context_word = ""
    for index, word in enumerate(lowered):
        following = tags[index + 1] if index + 1 < len(tags) else None
        if tags[index] == "TO":
            following_word = lowered[index + 1] if following == "OPEN" else ""
            tags[index] = "TO_INF" if _verb_inflection(following_word) == "base" else "PREP"
        elif tags[index] == "OPEN":
            tags[index] = _open_tag(word, words[index][0].isupper(), context, context_word, following)
        if tags[index] != "ADV":
            context, context_word = tags[index], word
    return tags


def _chunk(tags: list[str]) -> list[tuple[int, int]]:
    """Greedy left-to-right phrases as word ranges [first, last)."""
    chunks = []
    index = 0
    while index < len(tags):
        tag = tags[index]
        if tag in ("PRON", "SUBJ"):
            end = index + 1
        elif tag == "PREP":
            end = _noun_phrase_end(tags, index + 1)
            end = end if end > index + 1 else _pronoun_end(tags, index + 1)
        elif tag in _NP_TAGS or (tag == "ADV" and _noun_phrase_end(tags, index) > index):
            end = _noun_phrase_end(tags, index)
        elif tag in _VP_TAGS:
            end = _verb_phrase_end(tags, index)
        else:
            end = index
        if end > index:
            chunks.append((index, end))
            index = end
        else:
            index += 1
    return chunks


def _noun_phrase_end(tags: list[str], start: int) -> int:
    """End of the noun phrase starting at start (start itself when there is none). A
    determiner after the phrase's first head word starts a new phrase."""
    end = start
    while end < len(tags) and tags[end] == "DET":
        end += 1
    while end < len(tags):
        if tags[end] in _NP_HEADS:
            end += 1
        elif tags[end] == "ADV" and end + 1 < len(tags) and tags[end + 1] in _NP_HEADS:
            end += 1  # "a very large model"
        else:
            break
    return end


def _pronoun_end(tags: list[str], start: int) -> int:
    """The preposition's object when it is a pronoun ("with them"), else the preposition alone."""
    return start + 1 if start < len(tags) and tags[start] in ("PRON", "SUBJ") else start


def _verb_phrase_end(tags: list[str], start: int) -> int:
    end = start
    while end < len(tags) and tags[end] in _VP_TAGS:
        end += 1
    return end if any(tag in _VP_CORES for tag in tags[start:end]) else start
